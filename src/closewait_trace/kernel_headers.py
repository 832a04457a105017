"""Which kernel header tree bcc compiles against, and a safe place for bcc's
temporary files.

bcc wants a header tree even for a program that includes nothing. The
running kernel's own headers are used when installed. Cloud and microVM
kernels often have none; then the distro's generic headers are merged into a
root-owned cache and BCC_KERNEL_SOURCE points there. That is sound only
because bpf/closewait.bpf.c reads nothing but tracepoint fields, whose layout
bcc takes from the running kernel's tracefs: no struct from these headers is
ever used. We never write under /lib/modules.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import stat
from dataclasses import dataclass
from typing import Optional

from closewait_trace.errors import EXIT_NO_HEADERS, UserError

CACHE_DIR = "/var/cache/closewait-trace/kernel-headers"
RUNTIME_TMP = "/run/closewait-trace"

_ARCH_SUFFIXES = {
    "x86_64": ("-amd64", "-generic", "-cloud-amd64", "-rt-amd64"),
    "aarch64": ("-arm64", "-generic", "-cloud-arm64", "-rt-arm64"),
}


@dataclass(frozen=True)
class HeaderChoice:
    kind: str                 # env | running | generic | kheaders
    path: Optional[str]       # what BCC_KERNEL_SOURCE is set to, if anything
    detail: str               # for -v and the start record

    def describe(self) -> str:
        return f"{self.kind}: {self.detail}"


def _complete(tree: str) -> bool:
    return (os.path.isfile(os.path.join(tree, "include/generated/autoconf.h"))
            and os.path.isfile(os.path.join(tree, "include/linux/kconfig.h")))


def _running_tree_complete(modules_dir: str) -> bool:
    """The running kernel's headers under /lib/modules/RELEASE: one tree in
    build/, or, as Debian and Ubuntu split them, the generated arch part in
    build/ and the common part in source/ (linux-headers-*-common). bcc
    reads both build/ and source/, so either layout is complete."""
    build = os.path.join(modules_dir, "build")
    if _complete(build):
        return True
    source = os.path.join(modules_dir, "source")
    return (os.path.isfile(os.path.join(build, "include/generated/autoconf.h"))
            and os.path.isfile(os.path.join(source, "include/linux/kconfig.h")))


def _version_key(name: str) -> tuple:
    return tuple(int(n) for n in re.findall(r"\d+", name))


def _generic_candidates(usr_src: str, machine: str) -> list[str]:
    suffixes = _ARCH_SUFFIXES.get(machine, ())
    try:
        names = os.listdir(usr_src)
    except OSError:
        return []
    found = [n for n in names if n.startswith("linux-headers-")
             and n.endswith(suffixes)
             and os.path.isfile(os.path.join(usr_src, n, "include/generated/autoconf.h"))]
    return [os.path.join(usr_src, n) for n in sorted(found, key=_version_key, reverse=True)]


def _common_tree(arch_tree: str) -> Optional[str]:
    """Debian splits headers in an arch part and a common part; the arch
    part's Makefile names the common one."""
    try:
        with open(os.path.join(arch_tree, "Makefile")) as f:
            for line in f:
                m = re.match(r"\s*include\s+(\S+)/Makefile\s*$", line)
                if m and os.path.isdir(m.group(1)):
                    return m.group(1)
    except OSError:
        pass
    guess = re.sub(r"-[a-z0-9]+$", "-common", arch_tree.rstrip("/"))
    return guess if os.path.isdir(guess) else None


def _check_private_dir(path: str) -> None:
    """Refuse a cache that anyone but us (root, when tracing) could have
    written to: bcc would compile whatever headers it finds there."""
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UserError(f"{path} is not a directory owned by us and closed to others",
                        EXIT_NO_HEADERS, "remove it and run again")


def _make_private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    _check_private_dir(path)


def _mirror(src: str, dst: str) -> None:
    """Overlay src onto dst as absolute symlinks (files and linked dirs)."""
    for root, dirs, files in os.walk(src):
        rel = os.path.relpath(root, src)
        target_dir = os.path.join(dst, rel) if rel != "." else dst
        os.makedirs(target_dir, exist_ok=True)
        for name in list(dirs):
            path = os.path.join(root, name)
            if os.path.islink(path):
                dirs.remove(name)
                _replace_link(os.path.realpath(path), os.path.join(target_dir, name))
        for name in files:
            path = os.path.join(root, name)
            _replace_link(os.path.realpath(path), os.path.join(target_dir, name))


def _replace_link(source: str, link: str) -> None:
    if os.path.lexists(link):
        if os.path.isdir(link) and not os.path.islink(link):
            shutil.rmtree(link)
        else:
            os.unlink(link)
    os.symlink(source, link)


def merged_tree(arch_tree: str, cache_dir: str = CACHE_DIR) -> str:
    """A complete tree in the cache: common headers with the arch part on top."""
    common = _common_tree(arch_tree)
    if common is None:
        raise UserError(f"{arch_tree} has no matching common headers",
                        EXIT_NO_HEADERS, "reinstall the distro's linux-headers package")
    _make_private_dir(os.path.dirname(cache_dir))
    _make_private_dir(cache_dir)
    final = os.path.join(cache_dir, os.path.basename(arch_tree))
    stamp = os.path.join(final, ".closewait-trace-complete")
    if os.path.isfile(stamp) and _complete(final):
        return final
    building = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    _mirror(common, building)
    _mirror(arch_tree, building)
    with open(os.path.join(building, ".closewait-trace-complete"), "w") as f:
        f.write(f"{common}\n{arch_tree}\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(building, final)
    return final


def choose_headers(release: Optional[str] = None, lib_modules: str = "/lib/modules",
                   usr_src: str = "/usr/src", cache_dir: str = CACHE_DIR,
                   machine: Optional[str] = None, environ=os.environ) -> HeaderChoice:
    release = release or os.uname().release
    machine = machine or platform.machine()
    preset = environ.get("BCC_KERNEL_SOURCE")
    if preset:
        return HeaderChoice("env", preset, f"BCC_KERNEL_SOURCE={preset} (set by you)")
    build = os.path.join(lib_modules, release, "build")
    if _running_tree_complete(os.path.join(lib_modules, release)):
        return HeaderChoice("running", None, f"{build} (headers of the running kernel {release})")
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return HeaderChoice("kheaders", None, "/sys/kernel/kheaders.tar.xz (built into the kernel)")
    for tree in _generic_candidates(usr_src, machine):
        path = tree if _complete(tree) else merged_tree(tree, cache_dir)
        return HeaderChoice("generic", path,
                            f"{path} (generic distro headers from {tree}; "
                            f"running kernel {release} has none)")
    raise UserError(f"no kernel headers found for {release} or any generic kernel",
                    EXIT_NO_HEADERS,
                    "install them: apt-get install linux-headers-$(uname -r) "
                    "|| apt-get install linux-headers-generic (Ubuntu) "
                    "|| apt-get install linux-headers-amd64 (Debian)")


def apply(choice: HeaderChoice) -> None:
    """Point bcc at the chosen headers and at a root-only temporary directory
    (bcc before 0.30 trusts header files planted in /tmp: CVE-2024-2314)."""
    if choice.path:
        os.environ["BCC_KERNEL_SOURCE"] = choice.path
    _make_private_dir(RUNTIME_TMP)
    os.environ["TMPDIR"] = RUNTIME_TMP
