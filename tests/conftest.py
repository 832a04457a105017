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
    config.addinivalue_line(
        "markers", "root: needs root but no kernel/BPF (ownership, setpriv); "
                   "skips without root, fails under CI=true")


def pytest_collection_modifyitems(config, items):
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


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for name, reason in item.user_properties:
        if name == "ci_unrunnable":
            pytest.fail(f"cannot run under CI=true: {reason}", pytrace=False)
