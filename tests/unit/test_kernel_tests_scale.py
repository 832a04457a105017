"""The kernel tests run on slow machines too (QEMU without KVM, about 50
times slower: scripts/kernel-matrix.sh), where every deadline is stretched by
CLOSEWAIT_TEST_STRETCH. A deadline written as a bare number in a kernel test
is one kernel's (or one machine's) speed encoded in the test: slowness would
pass for a failure. This reads the kernel tests and finds such numbers."""

import ast
from pathlib import Path

KERNEL_TESTS = Path(__file__).resolve().parents[1] / "kernel"
# The harness's own waits stretch their timeout themselves.
STRETCHED_BY_THE_HARNESS = {"wait_for", "wait_until", "start", "stop", "settle", "http_get"}


def bare_deadlines(source: str) -> list[tuple[int, str]]:
    """(line, call) of each call given timeout=<a number>, other than the
    harness's; and of each sleep of a shell command (gdb's `shell sleep N`)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        for kw in node.keywords:
            if (kw.arg == "timeout" and isinstance(kw.value, ast.Constant)
                    and isinstance(kw.value.value, (int, float))
                    and name not in STRETCHED_BY_THE_HARNESS):
                found.append((node.lineno, name))
        for arg in node.args:
            if isinstance(arg, ast.List):
                for item in arg.elts:
                    if (isinstance(item, ast.Constant) and isinstance(item.value, str)
                            and item.value.startswith("shell sleep ")):
                        found.append((node.lineno, item.value))
    return found


def test_the_finder_finds_what_it_looks_for():
    src = ("subprocess.run(['x'], timeout=30)\n"
           "p.communicate(timeout=stretch(30))\n"
           "tracer.wait_for(f, timeout=10)\n"
           "subprocess.Popen(['gdb', '-ex', 'shell sleep 30'])\n")
    assert bare_deadlines(src) == [(1, "run"), (4, "shell sleep 30")]


def test_no_kernel_test_has_a_deadline_that_does_not_stretch():
    bare = {f"{path.name}:{line} {call}"
            for path in sorted(KERNEL_TESTS.glob("*.py"))
            for line, call in bare_deadlines(path.read_text())}
    assert not bare, sorted(bare)
