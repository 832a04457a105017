"""tests/unit is pure: no root, no kernel, quick. A test marked as needing
root or the kernel here is an error at collection (tests/root and
tests/kernel are where they go); tests/root/test_unit_as_nobody.py runs this
whole folder as user nobody, which catches what no marker says."""

import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    wrong = [item.nodeid for item in items
             if str(item.path).startswith(HERE + os.sep)
             and any(item.get_closest_marker(m) for m in ("root", "kernel"))]
    if wrong:
        raise pytest.UsageError(
            f"tests/unit holds tests marked root or kernel (move them to tests/root or "
            f"tests/kernel): {', '.join(wrong[:5])}")
