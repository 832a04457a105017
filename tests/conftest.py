import os

import pytest


def kernel_tests_possible() -> str:
    """'' when kernel tests can run here, otherwise why not."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (run scripts/setup.sh)"
    return ""


def root_tests_possible() -> str:
    """'' when tests that need root (file ownership, setpriv) can run here."""
    if os.geteuid() != 0:
        return "needs root (file ownership, setpriv to another user)"
    return ""


def pytest_configure(config):
    # The gathering workers the tests start run their stand-in calls
    # (tests.unit.blocking_calls) from this checkout: named here, since a
    # worker no longer imports from the directory it was started in.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([repo] + paths)
    config.addinivalue_line(
        "markers", "root: needs root but no kernel/BPF (ownership, setpriv); "
                   "skips without root, fails under CI=true")


def mark_unrunnable(items) -> None:
    reasons = {"kernel": kernel_tests_possible(), "root": root_tests_possible()}
    for item in items:
        marker = next((m for m in reasons if reasons[m] and item.get_closest_marker(m)), None)
        if marker is None:
            continue
        reason = reasons[marker]
        if os.environ.get("CI") == "true":
            # Under CI a kernel or root test that cannot run is a failure, not a skip.
            item.user_properties.append(("ci_unrunnable", f"{marker} test: {reason}"))
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


# ------------------------------------------ tests/unit once, as user nobody
# tests/root/test_unit_as_nobody.py runs the whole of tests/unit as nobody,
# which is the stricter run (a unit test that needed root fails there). A
# session that runs it therefore leaves tests/unit's items out of its own
# run instead of running the folder a second time as root; the nobody run's
# counts are said under "tests per folder". A session without it (tests/unit
# alone, a -k that leaves it out, no root) runs tests/unit itself.

UNIT_AS_NOBODY = "tests/root/test_unit_as_nobody.py::test_tests_unit_pass_as_nobody"


def leave_unit_to_nobody(config, items) -> None:
    if root_tests_possible() or not any(i.nodeid == UNIT_AS_NOBODY for i in items):
        return
    unit = [i for i in items if i.nodeid.startswith("tests/unit/")]
    if unit:
        config.hook.pytest_deselected(items=unit)
        left = set(unit)
        items[:] = [i for i in items if i not in left]
        config._unit_left_to_nobody = True


@pytest.hookimpl(trylast=True)      # after -k and -m have deselected theirs
def pytest_collection_modifyitems(config, items):
    leave_unit_to_nobody(config, items)
    mark_unrunnable(items)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for name, reason in item.user_properties:
        if name == "ci_unrunnable":
            pytest.fail(f"cannot run under CI=true: {reason}", pytrace=False)


# ------------------------------------------------- tests write only under tmp
# A test that writes into the working tree (a recording named "-" was once
# committed by accident) fails the run: the files it left are listed. Only
# paths that are new and untracked count, so editing files during a run does
# not; what .gitignore lists (caches) is not looked at.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def untracked_files() -> set:
    import subprocess
    try:
        out = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "-z",
                              "--untracked-files=all"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if out.returncode != 0:            # not a git checkout (an unpacked tarball)
        return set()
    return {e[3:] for e in out.stdout.decode(errors="replace").split("\0") if e.startswith("?? ")}


def pytest_sessionstart(session):
    session.config._untracked_before = untracked_files()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_untracked_before", None)
    if before is None:
        return
    left = sorted(untracked_files() - before)
    if left:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(f"FAILED: the tests left {len(left)} file(s) in the working "
                                f"tree (write under tmp_path instead): {', '.join(left[:10])}",
                                red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# ------------------------------------------------------ counts per folder
# The suite's folders (docs/testing.md): unit (pure, no root), bounds
# (memory and time on hostile input), repo (the repository's files against
# the tool), root (root, no kernel), kernel (root and BPF). The summary
# says what each ran, so a test that moved or vanished shows in CI's log.

def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts: dict = {}
    for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(report, "nodeid", "") or ""
            parts = nodeid.split("/")
            folder = "/".join(parts[:2]) if len(parts) > 2 and parts[0] == "tests" else "other"
            by = counts.setdefault(folder, {})
            by[outcome] = by.get(outcome, 0) + 1
    left = getattr(config, "_unit_left_to_nobody", False)
    if not counts and not left:
        return
    terminalreporter.write_sep("-", "tests per folder")
    for folder in sorted(counts):
        by = counts[folder]
        terminalreporter.write_line(
            f"{folder}: {sum(by.values())} ("
            + ", ".join(f"{n} {o}" for o, n in sorted(by.items())) + ")")
    if left:
        # The nobody run's own count (it runs the whole folder, whatever
        # this session's selection left of it).
        ran = getattr(config, "_unit_as_nobody", "") or "did not run to its end"
        terminalreporter.write_line(f"tests/unit: run as user nobody by {UNIT_AS_NOBODY}: {ran}")
