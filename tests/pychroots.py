"""The CPython interpreters the tests run besides Debian 12's 3.11: 3.12
(Ubuntu 24.04's) and 3.13 (Debian 13's), each in a chroot that
scripts/setup.sh test builds with mmdebstrap (scripts/pychroots.sh). A
program runs there as `chroot DIR python3.X SCRIPT`: to the tracer an
ordinary process whose binary is DIR/usr/bin/python3.X."""

import os
import shutil
import subprocess
import uuid

import pytest

ROOT = os.environ.get("CW_PYCHROOTS", "/var/cache/closewait-trace")
CHROOTS = {(3, 12): f"{ROOT}/py312-noble", (3, 13): f"{ROOT}/py313-trixie"}


def chroot_of(version) -> str:
    """The chroot holding CPython `version`, with its headers; skipped when
    missing (a failure under CI=true: setup builds it)."""
    d = CHROOTS[version]
    if not os.path.exists(f"{d}/usr/bin/python{version[0]}.{version[1]}"):
        why = (f"no CPython {version[0]}.{version[1]} chroot at {d}: "
               f"scripts/setup.sh test builds it")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    return d


class Script:
    """A file inside the chroot: .path as the program there sees it,
    .host as the tracer (and the test) sees it. remove() when done."""

    def __init__(self, version, name: str, text: str):
        self.root = chroot_of(version)
        self.dir = f"/tmp/cw-test-{uuid.uuid4().hex[:12]}"
        os.makedirs(self.root + self.dir)
        self.path = f"{self.dir}/{name}"
        self.host = self.root + self.path
        with open(self.host, "w") as f:
            f.write(text)
        self.argv = ["chroot", self.root, f"python{version[0]}.{version[1]}", self.path]

    def remove(self):
        shutil.rmtree(self.root + self.dir, ignore_errors=True)


def popen(script: Script, **kw) -> subprocess.Popen:
    return subprocess.Popen(script.argv, **kw)
