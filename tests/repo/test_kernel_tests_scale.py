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


def _reads_the_clock(node, clocked: set) -> bool:
    return any((isinstance(n, ast.Attribute) and n.attr in ("monotonic", "time", "perf_counter"))
               or (isinstance(n, ast.Name) and n.id in clocked) for n in ast.walk(node))


def _is_number(node) -> bool:
    # 0 is no speed: "time left <= 0" is a deadline check, not a bound.
    return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
        and not isinstance(node.value, bool) and node.value != 0


def bare_deadlines(source: str) -> list[tuple[int, str]]:
    """(line, call) of each call given timeout=<a number>, other than the
    harness's; of each sleep of a shell command (gdb's `shell sleep N`); and
    of each elapsed time (anything computed from the clock) compared with a
    bare number."""
    found = []
    tree = ast.parse(source)
    clocked = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and _reads_the_clock(node.value, set())
               for t in node.targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and _reads_the_clock(node.left, clocked) \
                and any(_is_number(c) for c in node.comparators):
            found.append((node.lineno, "elapsed compared with a number"))
            continue
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
           "subprocess.Popen(['gdb', '-ex', 'shell sleep 30'])\n"
           "took = time.monotonic() - started\n"
           "assert took < 60\n"
           "assert took < stretch(60)\n"
           "assert time.monotonic() - t0 <= 2.5\n"
           "assert len(x) < 60\n")
    assert sorted(bare_deadlines(src)) == [(1, "run"), (4, "shell sleep 30"),
                                           (6, "elapsed compared with a number"),
                                           (8, "elapsed compared with a number")]


def test_no_kernel_test_has_a_deadline_that_does_not_stretch():
    bare = {f"{path.name}:{line} {call}"
            for path in sorted(KERNEL_TESTS.glob("*.py"))
            for line, call in bare_deadlines(path.read_text())}
    assert not bare, sorted(bare)
