"""The way to the directory a recording goes in, and the names beside it:
real directories and links made by a real unprivileged user (setpriv to
nobody). Needs root, no kernel.

Review finding F6: nobody owned a directory on the path and put a link in
it to a root-only directory; `-w THEIRS/d/cw.jsonl --force` deleted and
replaced root's files there (only the file name itself was checked for a
link). F9: nobody's cw.jsonl.7 beside a recording that never writes that
name refused the recording."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from closewait_trace.errors import EXIT_FILE, UserError
from closewait_trace.files import parts, recording
from tests.unit import recordfactory

pytestmark = pytest.mark.root

NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture
def shared_dir():
    """A root-owned directory in /tmp; each test sets its mode."""
    path = tempfile.mkdtemp(prefix="cw-path-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(script: str) -> None:
    subprocess.run(AS_NOBODY + ["/usr/bin/python3", "-c", script], check=True, timeout=30)


@pytest.fixture
def victim(tmp_path):
    """A root-only directory holding root's earlier recording."""
    d = tmp_path / "victim"
    d.mkdir(mode=0o700)
    for name, text in (("cw.jsonl", "ROOT'S RECORDING\n"), ("cw.jsonl.3", "ROOT'S PART 3\n")):
        (d / name).write_text(text)
        os.chmod(d / name, 0o600)
    return d


def untouched(victim) -> bool:
    return sorted(os.listdir(victim)) == ["cw.jsonl", "cw.jsonl.3"] and \
        (victim / "cw.jsonl").read_text() == "ROOT'S RECORDING\n" and \
        (victim / "cw.jsonl.3").read_text() == "ROOT'S PART 3\n"


def recorder(path, **kw):
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=recordfactory.NO_FILTERS,
                           clock_offset_ns=0, snapshot_source=lambda: recordfactory.snapshot(),
                           **kw)
    r.open()
    return r


def test_a_link_in_another_users_directory_does_not_lead_root_into_its_own(shared_dir, victim):
    """F6 as found: nobody owns a directory on the way (here in a sticky
    /tmp-like directory) and links d to root's directory."""
    os.chmod(shared_dir, 0o1777)
    theirs = os.path.join(shared_dir, "att")
    as_nobody(f"import os\nos.mkdir({theirs!r}, 0o755)\nos.symlink({str(victim)!r}, "
              f"{theirs + '/d'!r})\n")
    with pytest.raises(UserError) as exc:
        recorder(os.path.join(theirs, "d", "cw.jsonl"), force=True)
    assert exc.value.exit_code == EXIT_FILE
    assert f"refusing to record in {theirs}/d: {theirs}: it is owned by uid {NOBODY}" \
        in exc.value.message
    assert untouched(victim)


def test_a_link_of_another_user_in_a_sticky_directory_is_not_followed(shared_dir, victim):
    """/tmp itself is fine to record in, but a link another user made there
    is theirs to point anywhere (fs.protected_symlinks may be off)."""
    os.chmod(shared_dir, 0o1777)
    link = os.path.join(shared_dir, "d")
    as_nobody(f"import os\nos.symlink({str(victim)!r}, {link!r})\n")
    with pytest.raises(UserError) as exc:
        recorder(os.path.join(link, "cw.jsonl"), force=True)
    assert exc.value.exit_code == EXIT_FILE
    assert f"{link}: it is a symbolic link owned by uid {NOBODY}" in exc.value.message
    assert untouched(victim)


def test_a_directory_others_may_write_without_the_sticky_bit_is_refused(shared_dir, victim):
    """Root's own directory, but 0777 without the sticky bit: anyone may
    replace what is in it (here with a link to root's directory)."""
    os.chmod(shared_dir, 0o777)
    as_nobody(f"import os\nos.symlink({str(victim)!r}, {shared_dir + '/d'!r})\n")
    for path in (os.path.join(shared_dir, "d", "cw.jsonl"), os.path.join(shared_dir, "cw.jsonl")):
        with pytest.raises(UserError) as exc:
            recorder(path, force=True)
        assert exc.value.exit_code == EXIT_FILE
        assert f"{shared_dir}: other users may write it and it is not sticky" \
            in exc.value.message, exc.value.message
    assert untouched(victim)
    assert sorted(os.listdir(shared_dir)) == ["d"]


def test_a_directory_another_user_owns_is_refused_at_any_depth(shared_dir, tmp_path):
    """Deeper down, a root directory 0755 in nobody's directory: nobody can
    rename it away and put their own in its place. Relative paths are
    checked from / too (through the working directory's path)."""
    os.chmod(shared_dir, 0o1777)
    theirs = os.path.join(shared_dir, "att")
    as_nobody(f"import os\nos.mkdir({theirs!r}, 0o755)\n")
    inner = os.path.join(theirs, "inner")
    os.mkdir(inner, 0o755)              # root's, inside nobody's
    before = os.getcwd()
    os.chdir(inner)
    try:
        for path in (os.path.join(inner, "cw.jsonl"), "cw.jsonl", "../att/inner/cw.jsonl"):
            with pytest.raises(UserError) as exc:
                recorder(path)
            assert f"{theirs}: it is owned by uid {NOBODY}" in exc.value.message, path
    finally:
        os.chdir(before)
    assert os.listdir(inner) == []


def test_roots_links_and_shared_sticky_directories_still_work(shared_dir, tmp_path):
    """What stays allowed: /tmp itself (sticky, root's), a directory of
    root's in it, links root made (to such a directory), '..' and
    relative paths."""
    os.chmod(shared_dir, 0o1777)
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = os.path.join(shared_dir, "to-real")
    os.symlink(str(real), link)                    # root's link, absolute
    os.symlink("../" + os.path.basename(shared_dir), os.path.join(shared_dir, "self"))
    before = os.getcwd()
    os.chdir(shared_dir)
    try:
        for i, path in enumerate((os.path.join(shared_dir, "a.jsonl"),
                                  os.path.join(link, "b.jsonl"),
                                  "self/self/c.jsonl",
                                  os.path.join(link, "..", "real", "d.jsonl"))):
            r = recorder(path)
            r.write(recordfactory.linger(ts=1000.0 + i))
            r.close()
            assert r.stopped is None
            assert parts.read([path]).of("linger")
    finally:
        os.chdir(before)
    assert sorted(os.listdir(real)) == ["b.jsonl", "d.jsonl"]
    assert os.path.isfile(os.path.join(shared_dir, "c.jsonl"))


def test_parts_of_the_shared_directory_are_made_through_its_handle(shared_dir, victim):
    """Once checked, nothing is looked up by the path again: the directory
    renamed and a link put at its name (by root here: nobody may no longer
    do it on a path we accept) changes nothing; parts go where the first
    went and root's files elsewhere are never touched."""
    os.chmod(shared_dir, 0o1777)
    mine = os.path.join(shared_dir, "mine")
    os.mkdir(mine, 0o700)
    for n in range(1, 40):
        (victim / f"cw.jsonl.{n}").write_text(f"PRECIOUS {n}\n")
    r = recorder(os.path.join(mine, "cw.jsonl"), max_bytes=1024)
    os.rename(mine, mine + ".old")
    os.symlink(str(victim), mine)
    for i in range(30):
        r.write(recordfactory.linger(ts=1000.0 + i, rport=40000 + i, padding="x" * 300))
        r.flush()
    r.close()
    assert r.stopped is None and r.part >= 3
    assert (victim / "cw.jsonl").read_text() == "ROOT'S RECORDING\n"
    for n in range(1, 40):
        assert (victim / f"cw.jsonl.{n}").read_text() == f"PRECIOUS {n}\n"
    assert f"cw.jsonl.{r.part}" in os.listdir(mine + ".old")


def plant_part_7(directory):
    as_nobody(f"import os\nfd = os.open({directory + '/cw.jsonl.7'!r}, "
              f"os.O_CREAT | os.O_WRONLY, 0o644)\nos.write(fd, b'x\\n')\n")


@pytest.mark.parametrize("rotation", [{}, {"max_bytes": 2**20, "max_files": 2},
                                      {"max_seconds": 60.0, "max_files": 7}])
def test_another_users_file_at_a_name_never_written_is_left_alone(shared_dir, rotation):
    """F9: nobody's cw.jsonl.7 beside a recording that will never write
    that name (no rotation, or a ring of 2 or 7 files) neither refuses it
    nor is touched; report then reads ours and skips theirs, saying why
    (not the same owner)."""
    os.chmod(shared_dir, 0o1777)
    plant_part_7(shared_dir)
    base = os.path.join(shared_dir, "cw.jsonl")
    r = recorder(base, force=True, **rotation)
    r.write(recordfactory.linger(ts=1000.0))
    r.close()
    assert r.stopped is None
    st = os.stat(base + ".7")
    assert st.st_uid == NOBODY and open(base + ".7").read() == "x\n"
    result = subprocess.run([sys.executable, "-m", "closewait_trace", "report", "--json", base],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"skipped {base}.7: owned by uid {NOBODY}" in result.stderr


@pytest.mark.parametrize("rotation", [{"max_bytes": 2**20},
                                      {"max_bytes": 2**20, "max_files": 8}])
def test_another_users_file_at_a_name_to_be_written_still_refuses_at_start(shared_dir,
                                                                           rotation):
    """Where the rotation will reach cw.jsonl.7 (no -W, or -W 8), it is
    refused at start as before: one line, exit 7, their file untouched."""
    os.chmod(shared_dir, 0o1777)
    plant_part_7(shared_dir)
    base = os.path.join(shared_dir, "cw.jsonl")
    with pytest.raises(UserError) as exc:
        recorder(base, force=True, **rotation)
    assert exc.value.exit_code == EXIT_FILE
    assert f"refusing to write {base}.7: it is a file owned by uid {NOBODY}" in exc.value.message
    assert not os.path.exists(base)
    assert open(base + ".7").read() == "x\n"
