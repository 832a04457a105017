"""Layers only point down: a module may import its own layer and those
below it, never one above. The order is declared here, once (the README's
Layout section says it in words); every import of every module counts:
at module level, inside functions and methods, under `if TYPE_CHECKING:`,
and a module named in a string (importlib.import_module). A module that
belongs to no layer fails too, so a new package gets a place on purpose."""

import ast
import pathlib
import re

import pytest

PACKAGE = "closewait_trace"
SRC = pathlib.Path(__file__).resolve().parents[2] / "src" / PACKAGE

# Bottom to top. A module's layer is that of the longest entry its name
# starts with.
LAYERS = (
    ("base", ("closewait_trace", "closewait_trace.errors", "closewait_trace.knobs",
              "closewait_trace.durations",      # the package itself: __version__
              "closewait_trace.wholewrite")),
    ("kernel", ("closewait_trace.kernel",)),      # the BPF program, its events and maps
    ("sockets", ("closewait_trace.sockets",)),    # socket tables, owners, ages, filters
    ("evidence", ("closewait_trace.evidence",)),  # why a holder keeps it, where in its code
    ("output", ("closewait_trace.output",)),      # records defined, built, shown, reported; sinks
    ("files", ("closewait_trace.files",)),        # recordings written and read, replay
    ("live", ("closewait_trace.live",)),          # the live session's wiring, its loop, snapshot
    ("cli", ("closewait_trace.cli", "closewait_trace.entry", "closewait_trace.__main__")),
)

_MODULE_NAME = re.compile(r"closewait_trace(\.[A-Za-z_][A-Za-z0-9_]*)*")


def layer_of(module: str):
    best = None
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    return None if best is None else best[0]


def _is_module(name: str, src: pathlib.Path) -> bool:
    path = src.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(source: str, module: str, is_package: bool, src: pathlib.Path = SRC):
    """(line, imported module) for every import of this package in source,
    wherever it is in the tree: functions, classes, conditionals."""
    found = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                # `from pkg import sub` imports the submodule sub.
                found.append((node.lineno, full if _is_module(full, src) else base))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and _MODULE_NAME.fullmatch(node.value) and "." in node.value \
                and _is_module(node.value, src):
            found.append((node.lineno, node.value))
    return sorted({(line, name) for line, name in found
                   if name == PACKAGE or name.startswith(PACKAGE + ".")})


def modules(src: pathlib.Path = SRC):
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        yield path, ".".join(parts), is_package


def upward_imports(src: pathlib.Path = SRC) -> list[str]:
    bad = []
    for path, module, is_package in modules(src):
        own = layer_of(module)
        if own is None:
            bad.append(f"{module}: in no layer (add it to LAYERS)")
            continue
        for line, target in imports_of(path.read_text(), module, is_package, src):
            theirs = layer_of(target)
            if theirs is None or theirs > own:
                where = "no layer" if theirs is None else LAYERS[theirs][0]
                bad.append(f"{path.relative_to(src.parent)}:{line}: {module} "
                           f"({LAYERS[own][0]}) imports {target} ({where})")
    return bad


def test_no_import_runs_up_a_layer():
    bad = upward_imports()
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_package_has_a_layer():
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    named = {prefix.split(".")[1] for _n, prefixes in LAYERS for prefix in prefixes
             if "." in prefix}
    assert packages <= named, packages - named


@pytest.mark.parametrize("snippet", [
    "from closewait_trace.live import filters\n",
    "def f():\n    from closewait_trace.live.filters import HolderFilter\n",
    "class C:\n    def m(self):\n        import closewait_trace.live.tracer\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
    "    from closewait_trace.live.tracker import Lingerer\n",
    "import importlib\ndef f():\n    importlib.import_module('closewait_trace.live.filters')\n",
    "def f():\n    from ..live import filters\n",
])
def test_the_walk_sees_an_upward_import_wherever_it_is(snippet, tmp_path):
    """The check itself: an upward import at module level, inside a
    function or method, under TYPE_CHECKING, relative, or by name."""
    src = tmp_path / PACKAGE
    for sub in ("output", "live"):
        (src / sub).mkdir(parents=True)
        (src / sub / "__init__.py").write_text("")
    (src / "__init__.py").write_text("")
    (src / "live" / "filters.py").write_text("")
    (src / "live" / "tracer.py").write_text("")
    (src / "live" / "tracker.py").write_text("")
    (src / "output" / "render.py").write_text(snippet)
    bad = upward_imports(src)
    assert len(bad) == 1 and "closewait_trace.output.render (output) imports " \
        "closewait_trace.live" in bad[0], bad
    # The same import from above is allowed.
    (src / "output" / "render.py").write_text("")
    (src / "live" / "tracer.py").write_text(snippet.replace("..live", ".")
                                            .replace("live.tracker", "output.render"))
    assert upward_imports(src) == []
