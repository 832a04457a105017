"""Hostile recordings, generated here: devices, FIFOs, decompression bombs,
endless lines, absurd part numbers, NaN, deep nesting. Every one gives
either the good records it holds or one line and exit 7, in bounded time and
memory. Each runs the real command line in a child process with an address
space limit, so a regression fails the test instead of the machine."""

import gzip
import json
import os
import resource
import subprocess
import sys

import pytest

from closewait_trace.files import parts, recording, stream
from closewait_trace.errors import EXIT_FILE
from tests.unit import memprobe, recordfactory

MEMORY_LIMIT = 1 << 30       # address space of the child: far above what reading needs


def header(part=0, capture="cap", **extra):
    rec = recording.header(part, capture, 0, 10**9, recordfactory.NO_FILTERS, "closewait")
    rec.update(start_ts=1000.0, hostname="h")
    rec.update(extra)
    return json.dumps(rec) + "\n"


def linger(i):
    return json.dumps(recordfactory.linger(ts=1000.0 + i, rport=40000 + i, owners=[],
                                           owner_kind="none", cause="x", summary="x")) + "\n"


def _limit():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def cli(*args, stdin=None, input=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "closewait_trace", *args], input=input,
                          stdin=stdin, capture_output=True, timeout=timeout, preexec_fn=_limit)


def assert_one_line_exit_7(result, needle):
    err = result.stderr.decode()
    assert result.returncode == EXIT_FILE, err
    assert err.count("\n") == 1 and needle in err, err
    assert "Traceback" not in err and "internal error" not in err


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
@pytest.mark.parametrize("command", [["-r"], ["report"]])
def test_devices_are_refused(device, command):
    assert_one_line_exit_7(cli(*command, device), "character device, not a recording file")


def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "cw.jsonl"
    os.mkfifo(fifo)                 # nobody ever writes: open() would block for ever
    assert_one_line_exit_7(cli("-r", str(fifo), timeout=30), "a FIFO, not a recording file")
    assert_one_line_exit_7(cli("report", str(fifo), timeout=30), "a FIFO")


def gzip_bomb(path, filler: bytes, gib: int, last_line: str = ""):
    """A valid header, then `gib` GiB of filler, as concatenated gzip members
    built once and repeated: a few MB on disk, built in well under a second."""
    block = filler * (64 * 1024 * 1024 // len(filler))
    member = gzip.compress(block, compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(gzip.compress(header().encode() + linger(0).encode(), mtime=0))
        for _ in range(gib * 16):
            f.write(member)
        if last_line:
            f.write(gzip.compress(last_line.encode(), mtime=0))


# '{"type":"x"}' and a linger of no valid shape pass the parser's gate and
# fail the schema: until 2026-12-07 they reset the stop, and 2 GiB of them
# took 438 s (these 4 GiB: past the 60 s timeout).
@pytest.mark.parametrize("filler", [b"\n", b"x", b"{}\n", b'{"type":"x"}\n',
                                    b'{"type":"linger","ts":1}\n'])
def test_decompression_bomb_is_bounded(tmp_path, filler):
    path = tmp_path / "bomb.jsonl.gz"
    gzip_bomb(path, filler, gib=4, last_line=linger(1))
    assert path.stat().st_size < 40 * 1024 * 1024
    result = cli("-r", str(path), "--json")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    shown = [json.loads(x) for x in result.stdout.decode().splitlines()]
    assert [r["rport"] for r in shown if r["type"] == "linger"] == [40000]
    assert "stopped reading after" in err and "nothing usable" in err


@pytest.mark.parametrize("unusable", ['{"type": "x"}', '{"type": "linger", "ts": 1}',
                                      '{"type": "header"}', "[1]", "x", ""])
def test_records_the_schema_rejects_count_toward_the_stop(tmp_path, unusable):
    """Any line that yields no usable record counts toward the stop,
    whichever check refuses it: the parser, or the schema of the file's
    version (which comes later, once the header has said the version)."""
    path = tmp_path / "typed.jsonl"
    with open(path, "w") as f:
        f.write(header() + linger(0))
        f.write((unusable + "\n") * (stream.BARREN_LINES + 10))
        f.write(linger(1))
    rec = parts.read([str(path)])
    assert [r["rport"] for r in rec.of("linger")] == [40000]
    assert any(f"stopped reading after {stream.BARREN_LINES + 1} lines" in p
               for p in rec.problems), rec.problems
    if unusable.startswith('{"type": "header"'):
        # A header mid-file that cannot start a recording: what follows is
        # not read, said as such, not as damage (test_parts.py).
        assert rec.skipped == 0
        assert any(f"skipped {stream.BARREN_LINES + 1} line(s) from a header" in p
                   for p in rec.problems), rec.problems
    else:
        assert rec.skipped == (0 if unusable == "" else stream.BARREN_LINES + 1)


def read_in_own_interpreter(path) -> tuple[int, int, float, float]:
    """parts.read of path in a fresh interpreter of its own (memprobe: not
    ru_maxrss, which a child inherits from the pytest process that forked
    it): (linger records, lines skipped, peak RSS MiB, MiB Python allocated)."""
    probe = ("import sys\n"
             "from closewait_trace.files import parts\n"
             "r = parts.read([sys.argv[1]])\n"
             "print(len(r.of('linger')), r.skipped)\n")
    out, peak_mib, traced_mib = memprobe.run(probe, str(path), traced=True, timeout=120)
    lingers, skipped = map(int, out.stdout.split())
    return lingers, skipped, peak_mib, traced_mib


def test_endless_line_is_skipped_in_bounded_memory(tmp_path):
    """A 200 MB line between good records: skipped and counted, never held."""
    path = tmp_path / "long.jsonl"
    with open(path, "w") as f:
        f.write(header() + linger(0))
        f.write('{"type": "linger", "padding": "')
        chunk = "a" * (1 << 20)
        for _ in range(200):
            f.write(chunk)
        f.write('"}\n' + linger(1))
    lingers, skipped, peak_mib, traced_mib = read_in_own_interpreter(path)
    assert (lingers, skipped) == (2, 1)
    assert peak_mib < 150, f"peak RSS {peak_mib:.0f} MiB for a 200 MB line"
    # What Python itself allocated, whatever malloc does with it: the pieces
    # of at most one line's worth (MAX_LINE_BYTES) and the read in hand.
    limit = (stream.MAX_LINE_BYTES + 4 * stream.READ_CHUNK) / (1 << 20) + 8
    assert traced_mib < limit, f"{traced_mib:.1f} MiB allocated to skip a 200 MB line"


def test_lines_of_millions_of_empty_objects_are_skipped_in_bounded_memory(tmp_path):
    """A line under MAX_LINE_BYTES can hold 2.8 million empty objects, 242 MB
    once parsed; a header and records of them took `report` and `-r` to 637
    MB (a review, 2026-12-07). Past MAX_CONTAINERS, a line is skipped
    unparsed; a line of the tool's own densest shape is read."""
    fat = '{"type": "linger", "x": [' + ",".join(["{}"] * 2_700_000) + "]}\n"
    assert len(fat) < stream.MAX_LINE_BYTES
    # The densest the writer makes: a list of holders, compact.
    dense = ('{"type":"linger","owners":['
             + ",".join(['{"pid":1,"comm":"","fd":3,"state":"S"}'] * 200_000) + "]}\n")
    assert len(dense) < stream.MAX_LINE_BYTES
    assert stream.parse_line(dense.encode()) is not None
    path = tmp_path / "fat.jsonl"
    with open(path, "w") as f:
        f.write(header() + linger(0))
        for _ in range(4):
            f.write(fat)
        f.write(linger(1))
    lingers, skipped, _peak_mib, traced_mib = read_in_own_interpreter(path)
    assert (lingers, skipped) == (2, 4)
    # What Python allocated: a line's bytes and its text, never its parse
    # (242 MB each before).
    assert traced_mib < 3 * stream.MAX_LINE_BYTES / (1 << 20) + 8, traced_mib


def test_absurd_part_numbers(tmp_path):
    """A part number of 10^15 must not make a gap list over range()."""
    base = tmp_path / "cw.jsonl"
    base.write_text(header(part=0) + linger(0))
    (tmp_path / "cw.jsonl.1").write_text(header(part=10**15) + linger(1))
    (tmp_path / "cw.jsonl.2").write_text(header(part=2**31 - 1) + linger(2))
    result = cli("report", "--json", str(base), timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 0, err
    rep = json.loads(result.stdout)
    assert len(rep["losses"]["missing_parts"]) <= parts.MAX_LISTED
    assert f"skipped {base}.1: has a damaged header: part is 1000000000000000" in err
    assert f"{2**31 - 2} part(s) missing in all" in err
    single = tmp_path / "alone.jsonl"
    single.write_text(header(part=10**15) + linger(0))
    assert_one_line_exit_7(cli("-r", str(single)), "damaged header: part is")


def test_nan_infinity_deep_nesting_huge_numbers_are_skipped_lines(tmp_path):
    path = tmp_path / "cw.jsonl"
    hostile = [
        '{"type": "linger", "age_s": NaN}',
        '{"type": "linger", "age_s": Infinity}',
        '{"type": "linger", "age_s": -Infinity}',
        '{"type": "linger", "age_s": 1e999}',
        '{"type": "linger", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "[" * 500_000,
        '{"type": "linger", "big": ' + "9" * 100_000 + "}",
        '{"type": 7}',
        '"just a string"',
    ]
    path.write_text(header() + linger(0) + "\n".join(hostile) + "\n" + linger(1))
    result = cli("-r", str(path), "--json")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    out = result.stdout.decode()
    assert "NaN" not in out and "Infinity" not in out
    assert [json.loads(x)["rport"] for x in out.splitlines()
            if json.loads(x)["type"] == "linger"] == [40000, 40001]
    assert f"skipped {len(hostile)} damaged line(s)" in err
    assert cli("report", str(path)).returncode == 0


def test_format_version_as_a_string_is_one_clear_message(tmp_path):
    path = tmp_path / "cw.jsonl"
    path.write_text(header(format_version="1") + linger(0))
    result = cli("-r", str(path))
    assert_one_line_exit_7(result, "damaged header: format_version is '1'")
    assert "reads up to" not in result.stderr.decode()      # no self-contradiction


def test_stdin_is_read_with_dash(tmp_path):
    """zcat a.gz | closewait-trace -r -"""
    data = gzip.compress((header() + linger(0) + linger(1)).encode())
    result = cli("-r", "-", "--json", input=data)
    assert result.returncode == 0, result.stderr
    assert [json.loads(x)["type"] for x in result.stdout.decode().splitlines()] == \
        ["linger", "linger"]
    result = cli("report", "--json", "-", input=(header() + linger(0)).encode())
    assert result.returncode == 0 and json.loads(result.stdout)["sockets"] == 1
    assert_one_line_exit_7(cli("-r", "-", input=b""), "standard input is empty")


def test_write_to_stdout_reads_back(tmp_path):
    """-w -: the recording goes to standard output (here straight into -r -)."""
    script = ("from closewait_trace.files import recording\n"
              "from tests.unit import recordfactory\n"
              "r = recording.Recorder(path='-', threshold_ns=10**9, filters=recordfactory.NO_FILTERS,"
              " clock_offset_ns=0, compress=True)\n"
              "r.open()\n"
              "for i in range(3):\n"
              "    r.write(recordfactory.linger(ts=1000.0 + i, rport=40000 + i))\n"
              "    r.flush()\n"
              "r.close()\n")
    written = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert written.returncode == 0 and written.stdout.startswith(b"\x1f\x8b")
    rec_path = tmp_path / "from-stdout.gz"
    rec_path.write_bytes(written.stdout)
    rec = parts.read([str(rec_path)])
    assert [r["rport"] for r in rec.of("linger")] == [40000, 40001, 40002]


def test_reading_a_later_part_names_the_first_file(tmp_path):
    """-r FILE.gz.1 with part 0 beside it: no false 'rotated away'."""
    path = tmp_path / "cw.jsonl.gz"
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=recordfactory.NO_FILTERS, clock_offset_ns=0,
                           compress=True, max_bytes=1024,
                           snapshot_source=lambda: {"type": "snapshot", "lingering": []})
    r.open()
    for i in range(40):
        r.write(json.loads(linger(i)))
        r.flush()
    r.close()
    assert (tmp_path / "cw.jsonl.gz.1").exists()
    rec = parts.read([str(path) + ".1"])
    assert not any("rotated away" in p for p in rec.problems), rec.problems
    assert any(f"read {path} for all its parts" in p for p in rec.problems)
    whole = parts.read([str(path)])
    assert whole.problems == [] and len(whole.of("header")) == r.part + 1


def test_rotation_by_time(tmp_path):
    import time
    path = tmp_path / "cw.jsonl"
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=recordfactory.NO_FILTERS, clock_offset_ns=0,
                           max_seconds=0.05, snapshot_source=lambda: {"type": "snapshot"})
    r.open()
    r.write(json.loads(linger(0)))
    r.flush()
    time.sleep(0.2)                  # longer than -G: the next batch opens part 1
    r.write(json.loads(linger(1)))
    r.flush()
    r.close()
    assert r.part == 1 and (tmp_path / "cw.jsonl.1").exists()
    assert [x["rport"] for x in parts.read([str(path)]).of("linger")] == [40000, 40001]


def test_wrapped_part_is_replaced_never_truncated_in_place(tmp_path):
    """-W wrap replaces our old part by a new file (unlink, create): a hard
    link to the old part keeps its content, as any other open or linked copy."""
    path = tmp_path / "cw.jsonl"
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=recordfactory.NO_FILTERS, clock_offset_ns=0,
                           max_bytes=1024, max_files=2,
                           snapshot_source=lambda: {"type": "snapshot"})
    r.open()
    i = 0
    while r.part < 1:
        r.write(json.loads(linger(i)))
        r.flush()
        i += 1
    os.link(tmp_path / "cw.jsonl.1", tmp_path / "kept")
    before = (tmp_path / "kept").read_bytes()
    while r.part < 3:
        r.write(json.loads(linger(i)))
        r.flush()
        i += 1
    r.close()
    assert (tmp_path / "kept").read_bytes().startswith(before[:200])
    assert os.stat(tmp_path / "kept").st_ino != os.stat(tmp_path / "cw.jsonl.1").st_ino


def test_a_record_longer_than_a_reader_accepts_is_counted_not_written(tmp_path, capsys):
    path = tmp_path / "cw.jsonl"
    r = recording.Recorder(path=str(path), threshold_ns=10**9, filters=recordfactory.NO_FILTERS, clock_offset_ns=0)
    r.open()
    r.write({"type": "process", "cmdline": "a" * (stream.MAX_LINE_BYTES + 1)})
    r.write(json.loads(linger(0)))
    r.close()
    assert r.write_errors == 1 and "longer than" in capsys.readouterr().err
    rec = parts.read([str(path)])
    assert rec.skipped == 0 and [x["type"] for x in rec.records] == ["header", "linger"]


def test_zlib_member_cut_between_members(tmp_path):
    """One stray byte after the last complete member: damage, said, good part kept."""
    path = tmp_path / "cw.jsonl.gz"
    path.write_bytes(gzip.compress((header() + linger(0)).encode()) + b"\x1f")
    rec = parts.read([str(path)])
    assert len(rec.of("linger")) == 1 and any("damaged or cut short" in p for p in rec.problems)


@pytest.mark.parametrize("tail,damaged", [(b"garbage after the members", True),
                                          (b"\x1f\x8b\x08\x00cut", True),
                                          (b"\x00" * 512, False)])
def test_what_follows_the_last_gzip_member(tmp_path, tail, damaged):
    """Bytes that are not a gzip member after the last one: what precedes
    them is read and the damage said. Zero bytes are padding, as for gzip(1)
    ("trailing zero bytes ignored")."""
    path = tmp_path / "cw.jsonl.gz"
    path.write_bytes(gzip.compress(header().encode(), mtime=0)
                     + gzip.compress(linger(0).encode(), mtime=0) + tail)
    rec = parts.read([str(path)])
    assert len(rec.of("linger")) == 1
    assert any("damaged or cut short" in p for p in rec.problems) == damaged, rec.problems


def test_a_member_with_a_wrong_crc_is_damage_and_what_precedes_is_kept(tmp_path):
    path = tmp_path / "cw.jsonl.gz"
    bad = bytearray(gzip.compress(linger(1).encode(), mtime=0))
    bad[-8] ^= 0xff                     # the CRC32 of the trailer
    path.write_bytes(gzip.compress((header() + linger(0)).encode(), mtime=0) + bytes(bad)
                     + gzip.compress(linger(2).encode(), mtime=0))
    rec = parts.read([str(path)])
    rports = [x["rport"] for x in rec.of("linger")]
    assert rports[0] == 40000 and 40002 not in rports, rports
    assert any("damaged or cut short" in p for p in rec.problems), rec.problems


@pytest.mark.parametrize("target", ["/proc/kmsg", "/sys/kernel/tracing/trace_pipe"])
def test_a_kernel_interface_that_calls_itself_a_regular_file_does_not_hang(tmp_path, target):
    """Red-team finding: a symlink planted as a recording, to a pseudo-file
    that reports S_IFREG yet blocks on read, hung -r and report for good
    (Ctrl-C included). Read non-blocking: one line, exit 7."""
    if not os.path.exists(target) or not os.access(target, os.R_OK):
        pytest.skip(f"{target} is not readable here")
    link = tmp_path / "incident.jsonl"
    link.symlink_to(target)
    for args in (["-r", str(link)], ["report", str(link)]):
        res = subprocess.run([sys.executable, "-m", "closewait_trace", *args],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == EXIT_FILE, res
        assert res.stderr.count("\n") == 1 and "a kernel interface on" in res.stderr, res.stderr


@pytest.mark.parametrize("members", [2, 3, 40])
def test_repeated_gzip_members_are_each_read_once(tmp_path, members):
    """Members that inflate to more than one READ_CHUNK each, concatenated:
    every one is read exactly once (old code read each later member again
    from zlib's unconsumed_tail: 2 members never ended, 40 would take
    2^40 times the work)."""
    path = tmp_path / "repeated.jsonl.gz"
    padding = "x" * (3 * stream.READ_CHUNK)
    member = gzip.compress((json.dumps(recordfactory.linger(summary=padding)) + "\n").encode(),
                           compresslevel=9, mtime=0)
    path.write_bytes(gzip.compress(header().encode(), mtime=0) + member * members)
    result = cli("-r", str(path), "--json", timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert [json.loads(x)["type"] for x in result.stdout.decode().splitlines()] == \
        ["linger"] * members


def test_the_headers_of_a_set_are_not_all_kept(tmp_path):
    """Every part of a set is planned (its header checked) before the
    first is read: what is kept of each header is its number, capture id,
    start and a digest, never the header, which may be megabytes of lists.
    16 parts with a 6 MB header each: the old code held all 16 through the
    read (tracemalloc peak above 100 MiB); now one at a time."""
    base = tmp_path / "cw.jsonl"
    for part in range(16):
        # Strings under the schema's text cap, lists of a few hundred:
        # large headers of a shape the schema accepts.
        big = {key: [f"{key}-{part}-{i}-" + "c" * 3950 for i in range(500)]
               for key in ("cgroups", "containers", "units")}
        filters = dict(recordfactory.NO_FILTERS, **big)
        name = base if part == 0 else tmp_path / f"cw.jsonl.{part}"
        name.write_text(header(part=part, filters=filters) + linger(part))
    probe = ("import sys\n"
             "from closewait_trace.files import parts, replay\n"
             "from closewait_trace.output import report\n"
             "r = parts.RecordingReader([sys.argv[1]])\n"
             "rep = report.build(r, source=r, by=['cause'])\n"
             "session = replay.Replay.open([sys.argv[1]])\n"
             "shown = sum(1 for x in session.records() if x['type'] == 'linger')\n"
             "print(rep['sockets'], len(r.files), shown, len(r.problems), r.skipped)\n")
    out, _peak_mib, traced_mib = memprobe.run(probe, str(base), traced=True, timeout=300)
    assert out.stdout.split() == ["16", "16", "16", "0", "0"], out.stdout
    assert traced_mib < 50, f"{traced_mib:.0f} MiB traced for 16 parts of 6 MB headers"


def _counting_decoder(monkeypatch):
    """parts.decoded_chunks, counting what it decodes."""
    decoded = [0]
    real = parts.decoded_chunks

    def counted(fd, state):
        for chunk in real(fd, state):
            decoded[0] += len(chunk)
            yield chunk
    monkeypatch.setattr(parts, "decoded_chunks", counted)
    return decoded


def test_the_end_of_a_gzip_of_newlines_is_found_where_reading_stops(tmp_path, monkeypatch):
    """-r gives the capture's end in its banner (end_ts, before reading):
    it inflated the whole last part, with no stop (a 2 MB gzip of 2 GiB of
    newlines: -r 5.96 s where report took 0.13 s). A stretch of newlines
    where reading stops ends the search too, and the end given is the last
    record before it, the last one reading shows."""
    path = tmp_path / "nl.jsonl.gz"
    gzip_bomb(path, b"\n", gib=1, last_line=linger(1))
    decoded = _counting_decoder(monkeypatch)
    reader = parts.RecordingReader([str(path)])      # its header read
    decoded[0] = 0
    assert reader.end_ts() == 1000.0
    assert decoded[0] <= 4 * stream.READ_CHUNK, f"{decoded[0] >> 20} MiB decoded"


def test_the_end_of_a_gzip_of_junk_is_searched_within_a_budget(tmp_path, monkeypatch):
    """Lines the schema rejects cannot be told without parsing them: the
    search of a gzip's end stops at a budget of decoded bytes (a ratio of
    the file's size, at least BARREN_BYTES), and no end is claimed."""
    path = tmp_path / "typed.jsonl.gz"
    gzip_bomb(path, b'{"type":"x"}\n', gib=1, last_line=linger(1))
    budget = max(stream.BARREN_BYTES, parts.TAIL_BUDGET_RATIO * path.stat().st_size)
    assert budget < 1 << 30
    decoded = _counting_decoder(monkeypatch)
    reader = parts.RecordingReader([str(path)])      # its header read
    decoded[0] = 0
    assert reader.end_ts() is None
    assert decoded[0] <= budget + stream.READ_CHUNK, f"{decoded[0] >> 20} MiB decoded"


def test_the_end_of_a_plain_file_is_read_from_its_end(tmp_path, monkeypatch):
    path = tmp_path / "cw.jsonl"
    with open(path, "w") as f:
        f.write(header())
        for i in range(5000):
            f.write(linger(i))
    assert path.stat().st_size > 8 * parts.TAIL_BYTES
    decoded = _counting_decoder(monkeypatch)
    reader = parts.RecordingReader([str(path)])      # its header read
    decoded[0] = 0
    assert reader.end_ts() == 1000.0 + 4999
    assert decoded[0] == 0
    # A gzip of records: its whole end, within the budget.
    gz = tmp_path / "cw.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert parts.RecordingReader([str(gz)]).end_ts() == 1000.0 + 4999


def test_the_names_beside_a_recording_are_not_all_held(tmp_path):
    """A shared directory may hold any number of other users' files: the
    search for FILE.N keeps only the names that match (os.listdir held the
    whole listing: 200,000 names of 250 characters, +61 MB). Python's own
    allocations, measured with tracemalloc (the same on any machine)."""
    import tracemalloc
    base = tmp_path / "cw.jsonl"
    base.write_text(header() + linger(0))
    (tmp_path / "cw.jsonl.1").write_text(header(part=1) + linger(1))
    for i in range(40_000):
        os.close(os.open(tmp_path / (f"{i:08d}" + "n" * 242), os.O_CREAT | os.O_WRONLY, 0o644))
    tracemalloc.start()
    try:
        found = parts.rotated_set(str(base))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == [str(base), str(base) + ".1"]
    # 40,000 names of 250 characters are 11 MB as str: a listing is above
    # that, the names that match a few hundred bytes.
    assert peak < 1 << 20, f"{peak / (1 << 20):.1f} MiB to find one sibling"
