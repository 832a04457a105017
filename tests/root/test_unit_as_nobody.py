"""tests/unit needs no root: run as user nobody (setpriv, no groups), on a
copy of the tree nobody can read and write, it passes. A unit test that
read another user's /proc, made a file of another user's or relied on root
passing file modes fails here, whatever it is marked; under CI=true one that
skips as nobody fails too. A whole run (tests/conftest.py) runs tests/unit
only this way, not a second time as root."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


CACHES = {"__pycache__", ".pytest_cache", ".hypothesis"}


def files_under(tree: str) -> set:
    """Every file's path under tree, relative, caches left out."""
    found = set()
    for top, dirs, files in os.walk(tree):
        dirs[:] = [d for d in dirs if d not in CACHES]
        found.update(os.path.relpath(os.path.join(top, f), tree) for f in files)
    return found


def test_tests_unit_pass_as_nobody(request):
    work = tempfile.mkdtemp(prefix="cw-unit-nobody-", dir="/tmp")
    try:
        os.chmod(work, 0o755)
        tree = os.path.join(work, "tree")
        # The tree as it is (some unit tests read docs/), without the
        # repository's history, venv and caches.
        shutil.copytree(ROOT, tree, symlinks=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "*.egg-info", *CACHES))
        subprocess.run(["chown", "-R", "65534:65534", tree], check=True)
        before = files_under(tree)
        # The interpreter with pytest: a venv inside /root (a clone there) is
        # not reachable by nobody, so its directory is bound under /tmp in a
        # mount namespace of the run's own.
        python = sys.executable
        bind = ""
        if sys.prefix != sys.base_prefix:
            venv = os.path.join(work, "venv")
            os.mkdir(venv)
            python = os.path.join(venv, os.path.relpath(sys.executable, sys.prefix))
            bind = f'mount --bind "{sys.prefix}" "{venv}" && '
        env = dict(os.environ, PYTHONPATH="src", HOME=tree, PYTHONDONTWRITEBYTECODE="1")
        run = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             bind + 'exec "$@"', "sh"] + NOBODY +
            [python, "-m", "pytest", "tests/unit", "-q", "-rfEs", "-p", "no:cacheprovider"],
            cwd=tree, env=env, capture_output=True, text=True, timeout=900)
        last = run.stdout.splitlines()[-1] if run.stdout.strip() else ""
        # A whole run's tests/unit is this run alone (tests/conftest.py):
        # its counts go under "tests per folder".
        request.config._unit_as_nobody = last.strip("= ")
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
        assert " passed" in last, run.stdout[-2000:]
        # What tests/conftest.py checks in a checkout ("tests write only
        # under tmp"), checked here: the copy has no .git for it to ask.
        left = sorted(files_under(tree) - before)
        assert not left, f"tests/unit left {len(left)} file(s) in the working tree: {left[:10]}"
        if os.environ.get("CI") == "true":
            # Nothing a CI machine installs is missing, so a skip here is a
            # unit test that ran only as root (the whole run runs this folder
            # only as nobody): it goes to tests/root.
            assert " skipped" not in last, run.stdout[-3000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
