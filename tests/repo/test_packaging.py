"""What ships beside the code: alert rules (promtool), the systemd unit
(systemd-analyze), the man page (man), shell completion (click), checked
with the real tools."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "packaging" / "prometheus"
UNIT = ROOT / "packaging" / "systemd" / "closewait-trace.service"
MAN = ROOT / "packaging" / "man" / "man8" / "closewait-trace.8"
TOOL = [sys.executable, "-m", "closewait_trace"]
MAX_EXPOSURE = 4.9


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing (scripts/setup.sh test installs it)")
        pytest.skip(f"{tool} not installed (scripts/setup.sh test installs it)")
    return path


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# --- alert rules ---------------------------------------------------------------

def test_alert_rules_are_valid():
    res = run([need("promtool"), "check", "rules", str(RULES / "closewait-trace.rules.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_alert_rules_unit_tests_pass_and_cover_every_alert():
    res = run([need("promtool"), "test", "rules", "closewait-trace.rules.test.yml"], cwd=RULES)
    assert res.returncode == 0, res.stdout + res.stderr
    alerts = set(re.findall(r"^\s*- alert: (\S+)", (RULES / "closewait-trace.rules.yml").read_text(),
                            re.M))
    tests = (RULES / "closewait-trace.rules.test.yml").read_text()
    assert len(alerts) >= 4
    for alert in alerts:
        # Each alert is evaluated at least twice: once firing, once not.
        blocks = re.findall(rf"alertname: {alert}\n\s*exp_alerts:(.*?)(?=\n\s*- eval_time|\n\s*- name|\Z)",
                            tests, re.S)
        assert any(b.split("#")[0].strip() == "[]" for b in blocks), f"{alert}: no test that it does not fire"
        assert any("exp_labels" in b for b in blocks), f"{alert}: no test that it fires"


# --- systemd unit ----------------------------------------------------------------

def unit_for_checking(tmp_path) -> Path:
    """The unit with its two installed paths pointed at executables that
    exist here (systemd-analyze verify checks that they do)."""
    text = UNIT.read_text()
    assert "/opt/closewait-trace/bin/closewait-trace" in text
    text = text.replace("/opt/closewait-trace/bin/closewait-trace",
                        str(Path(sys.executable).with_name("closewait-trace")))
    text = text.replace("/usr/local/lib/closewait-trace/keep-runs",
                        str(ROOT / "packaging" / "systemd" / "keep-runs"))
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def test_unit_verifies_clean(tmp_path):
    unit = unit_for_checking(tmp_path)
    # Documentation=man:closewait-trace(8) is checked too: man must find the page.
    env = dict(os.environ, MANPATH=f"{ROOT / 'packaging' / 'man'}:")
    res = run([need("systemd-analyze"), "verify", str(unit)], env=env)
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr


def exposure(unit: Path) -> float:
    res = run([need("systemd-analyze"), "security", "--offline=true", str(unit)])
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout + res.stderr)
    assert m, res.stdout + res.stderr
    return float(m.group(1))


def test_unit_security_exposure_is_ok_and_documented(tmp_path):
    figure = exposure(unit_for_checking(tmp_path))
    assert figure <= MAX_EXPOSURE
    service_doc = (ROOT / "docs" / "service.md").read_text()
    assert f"exposure {figure}" in service_doc, \
        f"docs/service.md must state the figure: exposure {figure}"


def test_unit_hardening_settings():
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "PrivateTmp": "yes", "ProtectHome": "yes", "UMask": "0077",
                       "StateDirectory": "closewait-trace"}.items():
        assert settings.get(key) == value, key
    # A descriptor bound the scrape server stays far inside (16 connections
    # at most), documented in docs/service.md's unit section.
    assert settings.get("LimitNOFILE") == "4096"
    assert "LimitNOFILE=4096" in (ROOT / "docs" / "service.md").read_text()
    assert "SystemCallFilter" in settings
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", text, re.M | re.S).group(1)
    for flag in ("-q", "-w /var/lib/closewait-trace/", "-C ", "-W ", "--metrics 127.0.0.1:"):
        assert flag in exec_start.replace("\\\n", " "), flag


def test_the_unit_leaves_the_running_kernels_headers_visible_and_modules_unloadable():
    """Issue 19 §2, seen under systemd 252 in a VM (scripts/systemd-vm.sh):
    ProtectKernelModules=yes makes /usr/lib/modules inaccessible, so the
    running kernel's headers (/lib/modules/RELEASE/build) were hidden and the
    start record said the kernel had none. Module loading is denied without
    it: no CAP_SYS_MODULE in the bounding set, no @module system calls."""
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings.get("ProtectKernelModules", "no") == "no"
    for key in ("InaccessiblePaths", "TemporaryFileSystem", "ReadOnlyPaths"):
        assert "modules" not in settings.get(key, ""), key
    caps = settings["CapabilityBoundingSet"].split()
    assert caps and not caps[0].startswith("~") and "CAP_SYS_MODULE" not in caps
    calls = settings["SystemCallFilter"].split()
    assert calls[0] == "@system-service"
    assert not {"@module", "init_module", "finit_module", "delete_module"} & set(calls)
    assert not {"init_module", "finit_module", "delete_module"} & allowed_calls(calls)


def allowed_calls(names: list[str]) -> set[str]:
    """The system calls a SystemCallFilter= list allows, its groups expanded
    by systemd itself (systemd-analyze syscall-filter)."""
    calls, seen, todo = set(), set(), list(names)
    while todo:
        name = todo.pop()
        if not name.startswith("@"):
            calls.add(name)
            continue
        if name in seen:
            continue
        seen.add(name)
        res = run([need("systemd-analyze"), "syscall-filter", name])
        assert res.returncode == 0, res.stderr
        words = [l.strip() for l in res.stdout.splitlines()[1:]
                 if l.strip() and not l.strip().startswith("#")]
        todo += words
    return calls


def test_the_readme_runs_without_systemd_what_the_unit_runs():
    """Issue 19 §2: running it without systemd (a container, an init without
    units) is documented with the unit's own command line and pre-start."""
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", text, re.M | re.S).group(1)
    pre = re.search(r"^ExecStartPre=(.*)$", text, re.M).group(1)
    doc = (ROOT / "docs" / "service.md").read_text()
    section = doc.split("## Without systemd", 1)[1].split("\n## ", 1)[0]
    shell = re.findall(r"^    (.*)$", section, re.M)
    commands = " ".join(shell).replace("\\ ", " ")
    unit_args = " ".join(exec_start.replace("\\\n", " ").split()[1:])
    assert f"exec /usr/sbin/closewait-trace {unit_args}" in " ".join(commands.split())
    assert f"/usr/lib/closewait-trace/keep-runs {pre.split()[1]}" in commands
    assert "SIGTERM" in section and "exits 0" in section


def test_keep_runs_moves_the_previous_recording_and_keeps_five(tmp_path):
    script = ROOT / "packaging" / "systemd" / "keep-runs"
    env = dict(os.environ, STATE_DIRECTORY=str(tmp_path))
    assert run([str(script), "5"], env=env).returncode == 0     # nothing yet: nothing to do
    assert list(tmp_path.iterdir()) == []
    for i in range(7):
        for part in ("closewait.jsonl.gz", "closewait.jsonl.gz.1"):
            (tmp_path / part).write_text(f'{{"type":"linger","run":{i}}}\n')
            os.utime(tmp_path / part, (1_700_000_000 + i * 60,) * 2)
        res = run([str(script), "5"], env=env)
        assert res.returncode == 0, res.stderr
        assert not (tmp_path / "closewait.jsonl.gz").exists()
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert len(runs) == 5 and all(r.startswith("run-") for r in runs)
    assert (tmp_path / runs[-1] / "closewait.jsonl.gz.1").read_text() == '{"type":"linger","run":6}\n'
    assert (tmp_path / runs[0] / "closewait.jsonl.gz").read_text() == '{"type":"linger","run":2}\n'
    assert oct((tmp_path / runs[0]).stat().st_mode & 0o777) == "0o700"


def test_runs_that_recorded_nothing_never_push_out_one_that_did(tmp_path):
    """Issue 19 §2: a restart loop (a configuration error) made a run a few
    seconds each, and with keep-runs 5 the incident's recording was gone
    within a minute. Runs with nothing in them are kept apart."""
    import gzip
    script = ROOT / "packaging" / "systemd" / "keep-runs"
    env = dict(os.environ, STATE_DIRECTORY=str(tmp_path))
    rec = tmp_path / "closewait.jsonl.gz"
    with gzip.open(rec, "wt") as f:         # the incident: a socket lingered
        f.write('{"type": "header"}\n{"type": "start"}\n{"type": "linger", "lport": 80}\n')
    os.utime(rec, (1_700_000_000,) * 2)
    assert run([str(script), "5"], env=env).returncode == 0
    for i in range(8):                       # then eight starts that recorded nothing
        with gzip.open(rec, "wt") as f:
            f.write('{"type":"header"}\n{"type":"start"}\n{"type":"snapshot","lingering":[]}\n')
        os.utime(rec, (1_700_000_060 + i * 10,) * 2)
        assert run([str(script), "5"], env=env).returncode == 0
    (rec.with_name("closewait.jsonl.gz")).write_bytes(b"")    # killed before a byte
    assert run([str(script), "5"], env=env).returncode == 0
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert [k for k in kept if k.startswith("run-")] == ["run-20231114T221320"]
    assert len([k for k in kept if k.startswith("empty-run-")]) == 5
    with gzip.open(tmp_path / "run-20231114T221320" / "closewait.jsonl.gz", "rt") as f:
        assert '"linger"' in f.read()


def test_the_unit_does_not_restart_what_will_never_work():
    from closewait_trace import errors
    text = (ROOT / "packaging" / "systemd" / "closewait-trace.service").read_text()
    [line] = [l for l in text.splitlines() if l.startswith("RestartPreventExitStatus=")]
    codes = set(map(int, line.split("=", 1)[1].split()))
    assert codes == {errors.EXIT_USAGE, errors.EXIT_NOT_ROOT, errors.EXIT_NO_BCC,
                     errors.EXIT_NO_HEADERS, errors.EXIT_NO_BPF}


# --- man page and completion -------------------------------------------------

def test_man_page_renders_without_warnings():
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8")
    res = run([need("man"), "--warnings", "-l", str(MAN)], env=env)
    assert res.returncode == 0
    assert res.stderr == "", res.stderr
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "EXAMPLES", "OUTPUT",
                    "OVERHEAD", "CAVEATS", "EXIT STATUS", "SEE ALSO"):
        assert re.search(rf"^{section}$", res.stdout, re.M), section


def help_text(*args) -> str:
    res = run(TOOL + list(args) + ["--help"])
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_every_long_option_of_help_is_in_the_man_page():
    """Read --help live, the main command's and every subcommand's, so an
    option added anywhere must be documented in the man page."""
    main_help = help_text()
    commands = re.findall(r"^  (\w[\w-]*)  ", main_help.split("Commands:")[1], re.M) \
        if "Commands:" in main_help else []
    assert "report" in commands
    rendered = run(["man", "-l", str(MAN)],
                   env=dict(os.environ, MANWIDTH="200", LC_ALL="C.UTF-8")).stdout \
        if shutil.which("man") else MAN.read_text().replace("\\-", "-")
    rendered = rendered.replace("\u2010", "-")
    missing = []
    for args in [()] + [(c,) for c in commands]:
        options = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", help_text(*args).split("Options:")[1]))
        assert "--help" in options
        for opt in sorted(options):
            if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", rendered):
                missing.append(" ".join(args + (opt,)))
        for command in args:
            assert re.search(rf"closewait-trace {command}\b", rendered), command
    assert missing == [], f"not in the man page: {missing}"


def test_bash_completion_from_click():
    script = run(TOOL, env=dict(os.environ, _CLOSEWAIT_TRACE_COMPLETE="bash_source")).stdout
    assert "complete -o nosort -F _closewait_trace_completion closewait-trace" in script
    bin_dir = str(Path(sys.executable).parent)
    assert Path(bin_dir, "closewait-trace").exists()
    probe = (script + "\nCOMP_WORDS=(closewait-trace --met); COMP_CWORD=1;"
             "_closewait_trace_completion closewait-trace; printf '%s\\n' \"${COMPREPLY[@]}\";"
             "COMPREPLY=(); COMP_WORDS=(closewait-trace rep); COMP_CWORD=1;"
             "_closewait_trace_completion closewait-trace; printf '%s\\n' \"${COMPREPLY[@]}\"")
    res = run(["bash", "-c", probe], env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"))
    assert res.stdout.split() == ["--metrics", "--metrics-no-comm", "report"], \
        res.stdout + res.stderr


# --- set-up: production runtime vs test tools ----------------------------------

def setup_plan(action: str) -> tuple[set, str]:
    res = run(["bash", str(ROOT / "scripts" / "setup.sh"), action],
              env=dict(os.environ, SETUP_PLAN_ONLY="1"))
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(": ", 1) for line in res.stdout.splitlines())
    return set(lines["packages"].split()), lines["python"]


def third_party_imports() -> set:
    """Top-level modules the package imports that are not its own or stdlib."""
    import ast
    found = set()
    for path in (ROOT / "src" / "closewait_trace").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "closewait_trace"}


@pytest.mark.root          # scripts/setup.sh runs as root
def test_trace_installs_the_runtime_only():
    packages, python = setup_plan("trace")
    assert python == "closewait-trace"            # no [test] extras: no pytest, hypothesis
    for tool in ("gcc", "libc6-dev", "gdb", "strace", "binutils", "socat", "bpfcc-tools",
                 "vagrant", "prometheus", "python3-pytest", "python3-hypothesis"):
        assert tool not in packages, tool
    # Everything the package imports comes from the distro with the runtime.
    debian = {"bcc": "python3-bpfcc", "click": "python3-click", "elftools": "python3-pyelftools",
              "prometheus_client": "python3-prometheus-client", "rich": "python3-rich"}
    imported = third_party_imports()
    assert imported <= set(debian), imported - set(debian)
    assert {debian[m] for m in imported} <= packages
    assert setup_plan("service") == (packages, python)


@pytest.mark.root
def test_test_installs_the_test_tools():
    packages, python = setup_plan("test")
    assert python == "closewait-trace[test]"
    assert {"gcc", "gdb", "strace", "socat", "prometheus", "man-db", "systemd"} <= packages
    assert setup_plan("trace")[0] < packages


def test_license_matches_pyproject():
    import tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "License :: OSI Approved :: Apache Software License" in meta["classifiers"]
    deps = {re.split(r"[<>=]", d)[0] for d in meta["dependencies"]}
    assert deps == {"click", "pyelftools", "prometheus-client", "rich"}


def test_the_systemd_vm_image_holds_every_dependency_of_the_package():
    """scripts/systemd-vm.sh installs the .deb in a guest without network:
    every package debian/control names (Depends and Recommends, the first of
    each alternative) must be in the image it builds."""
    script = (ROOT / "scripts" / "systemd-vm.sh").read_text()
    packages = set(re.search(r"^PACKAGES=\((.*?)\)", script, re.M | re.S).group(1).split())
    control = (ROOT / "debian" / "control").read_text().split("\nPackage: ", 1)[1]
    wanted = set()
    for field_name in ("Depends", "Recommends"):
        value = re.search(rf"^{field_name}:(.*?)(?=^\S)", control, re.M | re.S).group(1)
        for item in value.split(","):
            first = item.split("|")[0].strip()
            if first and not first.startswith("${"):
                wanted.add(first.split()[0])
    assert wanted and wanted <= packages, sorted(wanted - packages)

