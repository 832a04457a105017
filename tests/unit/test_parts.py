"""The part set (files/parts.py): which files are read, each once, in
order, and what is said about the others. Real files, no root needed."""

import glob
import gzip
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


V1 = os.path.join(os.path.dirname(__file__), "data", "v1-recording.jsonl")


def v3_recording(tmp_path):
    path = tmp_path / "v3.jsonl"
    write_all(path, [linger(i) for i in range(3)] + [closed(i) for i in range(3)])
    return path.read_bytes()


def test_recordings_of_different_versions_concatenated_are_each_read_by_their_own(tmp_path):
    """cat of a current recording and an older one (or gzip members of
    both): each header met switches the version its records are read by.
    The old code read the v1 recording's records as v3: 'damaged', its
    sockets lost."""
    v1 = open(V1, "rb").read()
    v3 = v3_recording(tmp_path)
    sockets = {}
    for name, data in (("v1", v1), ("v3", v3), ("v3v1", v3 + v1), ("v1v3", v1 + v3),
                       ("gz", gzip.compress(v3) + gzip.compress(v1))):
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(data)
        rep, reader = counted([str(path)])
        sockets[name] = rep["sockets"], reader.skipped, reader.problems
    assert sockets["v1"][0] > 0 and sockets["v3"][0] == 3
    for both in ("v3v1", "v1v3", "gz"):
        assert sockets[both][0] == sockets["v1"][0] + sockets["v3"][0], sockets
        assert sockets[both][1] == sockets["v1"][1] + sockets["v3"][1], sockets
        assert sockets[both][2] == [], sockets


def test_a_header_of_a_version_not_read_mid_file_stops_what_follows_and_says_so(tmp_path):
    """A format_version 99 header mid-file is checked like a first one:
    what follows it is not read as the version before (nor counted as
    damaged), and it is said; the next good header reads on."""
    v1 = open(V1, "rb").read()
    v99 = v1.replace(b'"format_version":1,', b'"format_version":99,')
    v3 = v3_recording(tmp_path)
    path = tmp_path / "v3v99v3.jsonl"
    path.write_bytes(v3 + v99 + v3.replace(b'"capture_id":"', b'"capture_id":"again-'))
    rep, reader = counted([str(path)])
    assert rep["sockets"] == 6
    assert reader.skipped == 0
    lines = len(v99.splitlines())
    assert reader.problems == [
        f"{path}: skipped {lines} line(s) from a header in the middle of the file on: "
        f"it has format version 99; this closewait-trace ({parts.__version__}) reads up to "
        f"{parts.FORMAT_VERSION}"], reader.problems
    # The two readable captures' headers are given; the unread one's is not.
    rec = parts.read([str(path)])
    assert [r["part"] for r in rec.of("header")] == [0, 0]
