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

from closewait_trace.errors import EXIT_FILE, EXIT_NO_HEADERS, UserError

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


def _series(version: tuple) -> int:
    """major * 1000 + minor: how far apart two kernels are, as one number."""
    return version[0] * 1000 + version[1] if len(version) >= 2 else 0


def generic_trees(usr_src: str, machine: str, release: str) -> list[str]:
    """Installed generic header trees, best first: the one whose kernel
    series is closest to the running kernel's (the headers most like its
    own), and among trees equally close the newest. Deterministic, whatever
    order the directory lists them in."""
    suffixes = _ARCH_SUFFIXES.get(machine, ())
    try:
        names = os.listdir(usr_src)
    except OSError:
        return []
    found = [n for n in names if n.startswith("linux-headers-")
             and n.endswith(suffixes)
             and os.path.isfile(os.path.join(usr_src, n, "include/generated/autoconf.h"))]
    running = _series(_version_key(release.split("-")[0]))

    def rank(name: str) -> tuple:
        version = _version_key(name[len("linux-headers-"):])
        return (abs(_series(version) - running), tuple(-v for v in version), name)

    return [os.path.join(usr_src, n) for n in sorted(found, key=rank)]


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
    # A problem with one of our own directories is said as what it is (exit
    # 7, a file or directory we cannot use), not as missing kernel headers.
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise UserError(f"{path} is not a directory owned by us and closed to others "
                        f"(someone else may have made it)", EXIT_FILE,
                        "remove it and run again")


def _make_private_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {path}: {exc.strerror}", EXIT_FILE,
                        "check that its parent exists and is writable by root")
    _check_private_dir(path)


def _entries(tree: str) -> dict:
    try:
        return {e.name: e for e in os.scandir(tree)}
    except OSError:
        return {}


def _merge(dst: str, common: str, arch: str) -> None:
    """dst = common with arch on top, linking as high up as possible: an
    entry only one tree has is one symlink (a whole directory at once);
    only directories both trees have are made, and merged inside. The arch
    part is small, so the result is a few hundred links, not ~32,000."""
    os.makedirs(dst, exist_ok=True)
    low, high = _entries(common), _entries(arch)
    for name in sorted(set(low) | set(high)):
        if name in low and name in high and low[name].is_dir() and high[name].is_dir():
            _merge(os.path.join(dst, name), low[name].path, high[name].path)
            continue
        winner = high.get(name) or low[name]      # a file in both: the arch one
        os.symlink(os.path.realpath(winner.path), os.path.join(dst, name))


# Written into the stamp file: a cache built by another layout is rebuilt.
_CACHE_LAYOUT = "layout 2 (directory links)"


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
    if _complete(final) and _stamp_layout(stamp) == _CACHE_LAYOUT:
        return final
    building = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    _merge(building, common, arch_tree)
    with open(os.path.join(building, ".closewait-trace-complete"), "w") as f:
        f.write(f"{_CACHE_LAYOUT}\n{common}\n{arch_tree}\n")
    # Swap in with two renames, so that a tracer compiling from the old tree
    # right now loses it for an instant at most, not for a whole rmtree.
    retired = f"{final}.old-{os.getpid()}"
    if os.path.lexists(final):
        os.rename(final, retired)
    os.rename(building, final)
    shutil.rmtree(retired, ignore_errors=True)
    return final


def _stamp_layout(stamp: str) -> str:
    try:
        with open(stamp) as f:
            return f.readline().strip()
    except OSError:
        return ""


def choose_headers(release: Optional[str] = None, lib_modules: str = "/lib/modules",
                   usr_src: str = "/usr/src", cache_dir: str = CACHE_DIR,
                   machine: Optional[str] = None, environ=os.environ) -> HeaderChoice:
    release = release or os.uname().release
    machine = machine or platform.machine()
    preset = environ.get("BCC_KERNEL_SOURCE")
    if preset:
        # Checked here: bcc itself would print its own multi-line complaint
        # on stdout (into a --json stream) and fail later, at compile time.
        # bcc then reads this one tree only (no build/ + source/ split).
        if not _complete(preset):
            raise UserError(f"BCC_KERNEL_SOURCE={preset!r} is not a complete kernel header "
                            "tree (it needs include/generated/autoconf.h and "
                            "include/linux/kconfig.h)", EXIT_NO_HEADERS,
                            "unset it to let closewait-trace choose, or point it at one "
                            "such as /lib/modules/$(uname -r)/build")
        return HeaderChoice("env", preset, f"BCC_KERNEL_SOURCE={preset} (set by you)")
    build = os.path.join(lib_modules, release, "build")
    if _running_tree_complete(os.path.join(lib_modules, release)):
        return HeaderChoice("running", None, f"{build} (headers of the running kernel {release})")
    if os.path.exists("/sys/kernel/kheaders.tar.xz"):
        return HeaderChoice("kheaders", None, "/sys/kernel/kheaders.tar.xz (built into the kernel)")
    trees = generic_trees(usr_src, machine, release)
    if trees:
        tree = trees[0]
        path = tree if _complete(tree) else merged_tree(tree, cache_dir)
        among = f", the closest to {release} of {len(trees)} installed" if len(trees) > 1 else ""
        return HeaderChoice("generic", path,
                            f"{path} (generic distro headers from {tree}{among}; "
                            f"none for the running kernel {release} in {build})")
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
