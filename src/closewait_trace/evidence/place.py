"""Which frame of a stack is "the place" to name in one line: the program's
own code that made the call, not the C library's wrapper or the Go
runtime's system call path under it (pure: frames in, a frame out).

The rule, in order, for the frames innermost first:
- a frame in a shared library the system installs (/lib, /usr/lib: libc,
  libpthread, the dynamic loader, libpython) is the call's machinery;
- a Go function of the standard library (its package path's first element
  has no dot and is not `main`: `syscall.Syscall`, `internal/poll.(*FD).Read`,
  `net.(*conn).Read`) is too; `main.handle` and `github.com/x/y.F` are not;
- the first frame left is the place. With none left (the whole stack is in
  system code, such as an installed interpreter's), the first frame outside
  the C library is named (`sock_recv`, CPython's recv), else the innermost:
  true, if less useful than the program's own function.
A C function's compiler clones (`f.isra.0`, `f.part.1`, `f.cold`) are C, not
Go packages, whatever their dots.
"""

from __future__ import annotations

import re
from typing import Optional

SYSTEM_DIRS = ("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/", "/usr/libexec/")
# The C library and the dynamic loader: the system call's wrappers.
_LIBC = re.compile(r"^(libc|libpthread|ld-linux[^/]*|ld)[.-]")
_GCC_CLONE = re.compile(r"\.(isra|part|constprop|cold|lto_priv|clone|localalias)(\.\d+)*$")
# /usr/lib/python3.11/ (the standard library and a venv's site-packages),
# /usr/lib/python3/dist-packages/ (Debian's packaged libraries).
_PY_LIBRARY = re.compile(r"/lib/python3(\.\d+)?/")
_GO_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-~]+)*\.")


def is_system_module(module: str) -> bool:
    return module.startswith(SYSTEM_DIRS) and ".so" in module.rsplit("/", 1)[-1]


def is_go_std(function: str) -> bool:
    """A Go standard library function, by its package path."""
    if not function or _GCC_CLONE.search(function) or not _GO_NAME.match(function):
        return False
    package_path = function.split("(", 1)[0]
    # The package is up to the first dot after the last slash.
    head, _, tail = package_path.rpartition("/")
    package = (head + "/" if head else "") + tail.split(".", 1)[0]
    first = package.split("/", 1)[0]
    return first != "main" and "." not in first


def is_machinery(frame: dict) -> bool:
    module = frame.get("module") or ""
    if isinstance(module, str) and is_system_module(module.replace(" (deleted)", "")):
        return True
    function = frame.get("function")
    return isinstance(function, str) and is_go_std(function)


def place_index(frames: list) -> Optional[int]:
    """Which of the frames (dicts as Frame.as_dict writes) to name; None for
    an empty stack."""
    usable = [i for i, f in enumerate(frames) if isinstance(f, dict)]
    for i in usable:
        if not is_machinery(frames[i]):
            return i
    for i in usable:
        module = str(frames[i].get("module") or "").rsplit("/", 1)[-1]
        if module and not _LIBC.match(module):
            return i
    return usable[0] if usable else None


def place_of(frames: list) -> Optional[dict]:
    """The frame to name, or None for an empty stack."""
    i = place_index(frames)
    return None if i is None else frames[i]


def is_python_library(file: str) -> bool:
    """A Python source file of the interpreter's library: the standard
    library, site- and dist-packages, frozen modules; not the program's own."""
    return _PY_LIBRARY.search(file) is not None or file.startswith("<frozen ")


def python_place(frames: list) -> Optional[dict]:
    """For a CPython process whose Python frames were copied with the stack
    (PyFrame dicts, innermost first), the place as a frame of the stack's
    shape: the innermost Python frame in the program's own code (not the
    standard library's socket.py or a site-packages library), else the
    innermost. None without Python frames."""
    usable = [f for f in frames if isinstance(f, dict) and isinstance(f.get("file"), str)]
    if not usable:
        return None
    own = next((f for f in usable if not is_python_library(f["file"])), usable[0])
    out = {"pc": "0x0", "function": own.get("function"), "offset": None,
           "module": own["file"], "build_id": None, "method": "python", "symbols": "python"}
    if type(own.get("line")) is int:
        out["file"], out["line"] = own["file"], own["line"]
    return out
