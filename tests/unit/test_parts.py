"""The part set (files/parts.py): which files are read, each once, in
order, and what is said about the others. Real files, no root needed."""

import glob
import os

from closewait_trace.files import parts
from closewait_trace.output import report
from tests.unit.test_recording import closed, linger, write_all


def rotated(tmp_path, n=24):
    """A real rotated recording (-C 1k -z): n sockets, each lingering then
    closed, spread over several parts."""
    path = tmp_path / "cw.jsonl.gz"
    recs = []
    for i in range(n):
        recs += [linger(i), closed(i)]
    r = write_all(path, recs, compress=True, max_bytes=1024)
    assert r.part >= 3
    return str(path)


def counted(paths):
    reader = parts.RecordingReader(paths)
    rep = report.build(reader, source=reader, by=["cause"])
    return rep, reader


def test_a_part_named_again_or_pulled_in_again_is_read_once(tmp_path):
    """The README's incident command, `report FILE*`: the glob names FILE
    and every FILE.N, which FILE already pulls in. Each part is read once
    however it is named (again, through a symlink, a hard link), and
    nothing is said of it: there is nothing wrong with the command."""
    path = rotated(tmp_path)
    alone, reader = counted([path])
    assert alone["sockets"] == 24 and reader.problems == []
    n_files, skipped = len(reader.files), reader.skipped   # the writer's test snapshots lack 'time'
    link = tmp_path / "link.jsonl.gz"
    link.symlink_to(path)
    hard = tmp_path / "other-name.gz"
    os.link(path + ".1", hard)
    named = sorted(glob.glob(path + "*"))
    assert len(named) == n_files
    for given in (named, list(reversed(named)), [path, path], [path, str(link)],
                  [str(link), path], [path + ".1", path], [path, str(hard)],
                  [str(hard)] + named):
        rep, reader = counted(given)
        assert rep["sockets"] == 24, given
        assert len(reader.files) == n_files, (given, reader.files)
        assert len(set(reader.files)) == n_files, (given, reader.files)
        assert reader.problems == [] and reader.skipped == skipped, (given, reader.problems)
        headers = [r["part"] for r in parts.RecordingReader(given) if r["type"] == "header"]
        assert headers == sorted(headers) == list(range(n_files)), (given, headers)


def test_a_later_part_given_alone_still_says_where_the_capture_is(tmp_path):
    path = rotated(tmp_path)
    rep, reader = counted([path + ".2", path + ".1"])
    assert len(reader.files) == 2
    assert any(f"read {path} for all its parts" in p for p in reader.problems)
