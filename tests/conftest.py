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


def pytest_collection_modifyitems(config, items):
    reason = kernel_tests_possible()
    if not reason:
        return
    for item in items:
        if "kernel" not in item.keywords:
            continue
        if os.environ.get("CI") == "true":
            # Under CI a kernel test that cannot run is a failure, not a skip.
            item.user_properties.append(("ci_unrunnable", reason))
        else:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    for name, reason in item.user_properties:
        if name == "ci_unrunnable":
            pytest.fail(f"kernel test cannot run under CI=true: {reason}", pytrace=False)
