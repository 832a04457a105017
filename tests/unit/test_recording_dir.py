"""The directory a recording goes in and the names it uses, over real files
(no root needed: the users and directories of other users are in
tests/root/test_recording_dir_path.py)."""

import os
import stat

import pytest

from closewait_trace.errors import EXIT_FILE, UserError
from closewait_trace.files import parts, recording
from tests.unit import recordfactory

ME = os.geteuid()


def fake_dir(mode, uid=ME, gid=0):
    return os.stat_result((stat.S_IFDIR | mode, 0, 0, 2, uid, gid, 0, 0, 0, 0))


@pytest.mark.parametrize("mode,uid,problem", [
    (0o755, ME, None),
    (0o700, 0, None),
    (0o1777, 0, None),                       # /tmp
    (0o1770, ME, None),                      # sticky, group-writable
    (0o555, 0, None),
    (0o755, 4242, "owned by uid 4242"),
    (0o1777, 4242, "owned by uid 4242"),     # sticky: its owner still removes anything
    (0o777, ME, "other users may write it and it is not sticky"),
    (0o757, 0, "other users may write it"),
    (0o775, ME, "group 0 may write it and it is not sticky"),
])
def test_which_directories_another_user_could_change(mode, uid, problem):
    got = recording.directory_problem(fake_dir(mode, uid), frozenset({0, ME}))
    assert (got is None) if problem is None else (problem in got), got


def test_a_file_is_not_a_directory():
    st = os.stat_result((stat.S_IFREG | 0o644, 0, 0, 1, ME, 0, 0, 0, 0, 0))
    assert recording.directory_problem(st, frozenset({ME})) == "it is not a directory"


def test_trusted_owners_are_root_us_and_the_user_who_ran_sudo(monkeypatch):
    monkeypatch.delenv("SUDO_UID", raising=False)
    assert recording.trusted_owners() == frozenset({0, ME})
    monkeypatch.setenv("SUDO_UID", "1000")
    assert recording.trusted_owners() == frozenset({0, ME, 1000})
    for junk in ("", "-1", "1000x", "9" * 40):
        monkeypatch.setenv("SUDO_UID", junk)
        assert recording.trusted_owners() == frozenset({0, ME})


def test_open_directory_refuses_what_others_may_write_on_the_way(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    inner = shared / "inner"
    inner.mkdir(mode=0o700)
    os.chmod(shared, 0o777)
    (tmp_path / "via").symlink_to(inner)
    for given in (inner, tmp_path / "via", shared):
        with pytest.raises(UserError) as exc:
            recording.open_directory(str(given))
        assert exc.value.exit_code == EXIT_FILE
        assert f"{shared}: other users may write it" in exc.value.message, exc.value.message
        assert "record into a directory that only root or you own" in exc.value.one_line()
    os.chmod(shared, 0o1777)             # sticky: allowed, as /tmp is
    for given in (inner, tmp_path / "via", shared):
        fd = recording.open_directory(str(given))
        os.close(fd)


def test_open_directory_follows_our_links_and_says_why_it_cannot(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "abs").symlink_to(real)
    (tmp_path / "rel").symlink_to("real")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "file").write_text("")
    for given in ("abs", "rel", "abs/../rel", "./rel/."):
        fd = recording.open_directory(str(tmp_path / given))
        try:
            assert os.path.samestat(os.fstat(fd), os.stat(real))
            os.listdir(fd)               # opened for reading: the parts are listed
        finally:
            os.close(fd)
    for given, why in (("loop", "too many symbolic links"), ("file", "Not a directory"),
                       ("missing/x", "No such file or directory")):
        with pytest.raises(UserError) as exc:
            recording.open_directory(str(tmp_path / given))
        assert exc.value.exit_code == EXIT_FILE and why in exc.value.message
        assert str(tmp_path / given.split("/")[0]) in exc.value.message


def recorder(path, **kw):
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=recordfactory.NO_FILTERS,
                           clock_offset_ns=0, snapshot_source=lambda: recordfactory.snapshot(),
                           **kw)
    r.open()
    return r


@pytest.mark.parametrize("rotation,used", [
    ({}, [0]),                                           # no -C/-G: FILE alone, even with -W
    ({"max_files": 5}, [0]),
    ({"max_bytes": 1024, "max_files": 2}, [0, 1]),
    ({"max_seconds": 60.0, "max_files": 3}, [0, 1, 2]),
    ({"max_bytes": 1024}, list(range(12))),              # no -W: every number, in time
])
def test_the_part_names_a_recording_will_use(tmp_path, rotation, used):
    r = recording.Recorder(path=str(tmp_path / "cw.jsonl"), threshold_ns=1, filters={},
                           clock_offset_ns=0, **rotation)
    assert [n for n in range(12) if r._uses_part(n)] == used


@pytest.mark.parametrize("rotation", [{}, {"max_bytes": 2**20, "max_files": 2}])
def test_a_fifo_at_a_name_never_written_does_not_refuse_the_recording(tmp_path, rotation):
    """Review finding F9: anything at FILE.7 refused a recording that would
    never write FILE.7 (it checked every FILE.N beside it)."""
    base = tmp_path / "cw.jsonl"
    os.mkfifo(str(base) + ".7")
    os.symlink("/etc/passwd", str(base) + ".6")
    r = recorder(base, force=True, **rotation)
    r.write(recordfactory.linger())
    r.close()
    assert r.stopped is None
    assert stat.S_ISFIFO(os.lstat(str(base) + ".7").st_mode)
    assert os.path.islink(str(base) + ".6")
    rec = parts.read([str(base)])
    assert rec.of("linger") and rec.files == [str(base)]
    assert any(p.startswith(f"skipped {base}.7: it is a FIFO") for p in rec.problems)


def test_a_fifo_at_a_name_to_be_written_still_refuses(tmp_path):
    base = tmp_path / "cw.jsonl"
    os.mkfifo(str(base) + ".7")
    with pytest.raises(UserError) as exc:
        recorder(base, force=True, max_bytes=2**20)          # no -W: reaches .7 in time
    assert "refusing to write" in exc.value.message and "a FIFO" in exc.value.message
    assert not base.exists()


def test_our_own_old_parts(tmp_path):
    """An earlier recording's parts of ours: one this recording will write
    needs --force; one it never writes is no obstacle, and --force removes
    it with the rest of the earlier recording (names we write only)."""
    base = tmp_path / "cw.jsonl"
    for name in ("cw.jsonl.1", "cw.jsonl.3", "cw.jsonl.007"):
        (tmp_path / name).write_text("old\n")
    r = recorder(base)                                       # no rotation: FILE only
    r.close()
    assert (tmp_path / "cw.jsonl.3").read_text() == "old\n"
    base.unlink()
    with pytest.raises(UserError) as exc:
        recorder(base, max_bytes=2**20, max_files=2)         # will write cw.jsonl.1
    assert f"{base}.1 exists" in exc.value.message and "--force" in exc.value.one_line()
    r = recorder(base, force=True, max_bytes=2**20, max_files=2)
    r.close()
    assert sorted(os.listdir(tmp_path)) == ["cw.jsonl", "cw.jsonl.007"]
