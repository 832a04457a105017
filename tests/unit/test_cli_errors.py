"""Every user error is one line, a documented exit code, never a traceback."""

import os
import subprocess
import sys

import pytest

from closewait_trace import cli, errors
from closewait_trace.kernel import kernel_headers, probe
from closewait_trace.sockets import capabilities


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "closewait_trace", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("args,needle", [
    (["-t", "banana"], "not a duration"),
    (["-t", "0s"], "greater than zero"),
    (["-p", "99999"], "not a port"),
    (["-P", "http"], "not a port"),
    (["-4", "-6"], "exclude each other"),
    (["--max-tracked", "5"], "max-tracked"),
    (["--no-such-option"], "No such option"),
])
def test_bad_options_exit_2_with_one_clear_line(args, needle):
    result = run_cli(*args)
    assert result.returncode == errors.EXIT_USAGE
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("args,line", [
    # click raises an option's missing value without its command: the
    # --help named was the whole tool's, not the subcommand's.
    (["snapshot", "--comm"], "closewait-trace: Option '--comm' requires an argument; "
                             "see 'closewait-trace snapshot --help'"),
    (["report", "--by"], "closewait-trace: Option '--by' requires an argument; "
                         "see 'closewait-trace report --help'"),
    (["-t", "1s", "snapshot", "-p"], "closewait-trace: Option '-p' requires an argument; "
                                     "see 'closewait-trace snapshot --help'"),
    (["-p"], "closewait-trace: Option '-p' requires an argument; "
             "see 'closewait-trace --help'"),
    # click runs its suggestion into the error ("--bogus Did you mean").
    # {no_such} is click's own words for the option (8.1 and 8.2: "No such
    # option: --bogus"; 8.5: "No such option '--bogus'."), ending as every
    # line of ours does, without a full stop.
    (["snapshot", "--verbos"], "closewait-trace: {no_such} (did you mean "
                               "--verbose?); see 'closewait-trace snapshot --help'"),
    (["top", "--bogus"], "closewait-trace: {no_such}; "
                         "see 'closewait-trace top --help'"),
])
def test_a_usage_error_names_its_subcommands_help_in_one_line(args, line):
    import click
    no_such = click.exceptions.NoSuchOption(args[-1]).message.rstrip(".")
    result = run_cli(*args)
    assert result.returncode == errors.EXIT_USAGE
    assert result.stderr.splitlines() == [line.format(no_such=no_such)]


def test_help_ends_with_examples():
    result = run_cli("--help")
    assert result.returncode == 0
    tail = result.stdout.strip().splitlines()
    assert "Examples:" in result.stdout
    assert tail[-1].strip().startswith("closewait-trace")
    assert all(len(line) <= 80 for line in result.stdout.splitlines())


def invoke_main(monkeypatch, args):
    """Run main() in-process; return (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["closewait-trace", *args])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    return exc.value.code


def test_not_root_exit_3(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert invoke_main(monkeypatch, []) == errors.EXIT_NOT_ROOT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sudo closewait-trace" in err


def test_bcc_missing_exit_4(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # as a full root shell has them (run unprivileged, the check for
    # CAP_BPF and CAP_PERFMON would answer first)
    monkeypatch.setattr(capabilities, "effective", lambda *a: (1 << 41) - 1)
    monkeypatch.setitem(sys.modules, "bcc", None)      # import bcc -> ImportError
    assert invoke_main(monkeypatch, []) == errors.EXIT_NO_BCC
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python3-bpfcc" in err


def test_no_headers_exit_5(tmp_path):
    with pytest.raises(errors.UserError) as exc:
        kernel_headers.choose_headers(release="9.9.9-test", lib_modules=str(tmp_path / "lm"),
                                      usr_src=str(tmp_path / "src"), cache_dir=str(tmp_path / "c"),
                                      machine="x86_64", environ={})
    assert exc.value.exit_code == errors.EXIT_NO_HEADERS
    assert "apt-get install" in exc.value.one_line()


@pytest.mark.parametrize("plant", ["world_writable", "a_file", "a_symlink"])
def test_our_private_directories_unusable_is_exit_7_not_no_headers(tmp_path, plant):
    """/run/closewait-trace (bcc's TMPDIR) or the header cache taken or
    opened by someone else: said as what it is, exit 7 (was exit 5, "no
    kernel headers")."""
    path = tmp_path / "closewait-trace"
    if plant == "world_writable":
        path.mkdir()
        path.chmod(0o777)
    elif plant == "a_file":
        path.write_text("")
    else:
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(errors.UserError) as exc:
        kernel_headers._make_private_dir(str(path))
    assert exc.value.exit_code == errors.EXIT_FILE
    assert str(path) in exc.value.one_line() and exc.value.one_line().count("\n") == 0


def test_missing_tracepoint_exit_6(tmp_path):
    (tmp_path / "events").mkdir()
    with pytest.raises(errors.UserError) as exc:
        probe.check_tracepoint(str(tmp_path))
    assert exc.value.exit_code == errors.EXIT_NO_BPF
    assert "inet_sock_set_state" in exc.value.message


def test_internal_error_is_one_line_unless_debug(monkeypatch, capsys):
    def boom(*a, **k):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(cli, "run_live", boom)
    monkeypatch.delenv("CLOSEWAIT_TRACE_DEBUG", raising=False)
    assert invoke_main(monkeypatch, []) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaboom" in err and "Traceback" not in err
