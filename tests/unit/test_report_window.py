"""report --since/--until (issue 19 §6): the same forms as a replay's
(10m, 2h, 1d6h ago; 13:20; ISO 8601; epoch); records before the window, and
the sockets reported before it, are not counted; records after it neither;
the report says the window it covers."""

import datetime as dt
import json
import subprocess
import sys
import time

import pytest

from closewait_trace.output import report
from tests.unit import recordfactory
from tests.unit.test_report_groups import closed, header, linger, process


def incident(t0: float) -> list[dict]:
    """A capture from t0 to t0 + 3 h: before t0 + 1 h, an early leak of 3
    sockets by `early` (one of them closed at t0 + 1.5 h, inside the window
    but reported before it); from t0 + 2 h, 4 sockets by `late` (one closed
    at t0 + 2.5 h); after t0 + 2.75 h, 2 sockets by `after`. Snapshots carry
    the kernel's cumulative histogram."""
    recs = [dict(header(start=t0)), process(100, "early"), process(200, "late"),
            process(300, "after")]
    for i in range(3):
        recs.append(linger(i, 100, "early", ts=t0 + 600 + i))
    recs.append({"type": "snapshot", "ts": t0 + 3000, "lingering": [],
                 "histogram_us": [{"from_us": 1048576, "to_us": 2097152, "count": 10}]})
    recs.append(closed(0, 5400.0, ts=t0 + 6000))           # an early socket closes late
    for i in range(10, 14):
        recs.append(linger(i, 200, "late", ts=t0 + 7200 + i))
    recs.append(closed(10, 1800.0, ts=t0 + 9000))
    recs.append({"type": "snapshot", "ts": t0 + 9500, "lingering": [],
                 "histogram_us": [{"from_us": 1048576, "to_us": 2097152, "count": 16}]})
    for i in range(20, 22):
        recs.append(linger(i, 300, "after", ts=t0 + 9950 + i))
    recs.append({"type": "summary", "ts": t0 + 10800, "still_lingering": [],
                 "histogram_us": [{"from_us": 1048576, "to_us": 2097152, "count": 30}],
                 "write_errors": 0})
    return recs


def programs(rep: dict) -> dict:
    return {r["program"].split()[0]: r["count"] for r in rep["by_program"]}


def test_records_before_the_window_are_not_counted():
    t0 = 1_800_000_000.0
    whole = report.build(incident(t0))
    assert programs(whole) == {"early": 3, "late": 4, "after": 2}
    rep = report.build(incident(t0), since=t0 + 3600)
    # The early sockets were reported before the window: not counted, not
    # even the one whose close falls inside it.
    assert programs(rep) == {"late": 4, "after": 2}
    assert rep["sockets"] == 6
    assert rep["window"]["since_ts"] == t0 + 3600 and rep["window"]["until_ts"] is None
    assert rep["captures"][0]["start_ts"] == t0 + 3600          # the capture's part in it
    # The kernel's histogram counted from the capture's start: 30 - 10.
    assert sum(b["count"] for b in rep["histogram_us"]) == 20
    # Still held at the end: 3 late + 2 after (the early ones are not counted).
    assert rep["still_lingering_total"] == 5


def test_records_after_until_are_not_counted_and_lingering_ones_end_at_it():
    t0 = 1_800_000_000.0
    rep = report.build(incident(t0), since=t0 + 3600, until=t0 + 9600)
    assert programs(rep) == {"late": 4}
    assert rep["captures"][0]["end_ts"] == t0 + 9600 and rep["captures"][0]["clean_end"]
    assert sum(b["count"] for b in rep["histogram_us"]) == 6       # 16 - 10
    still = rep["still_lingering"]
    assert len(still) == 3
    # Lingering at the window's end, not at the capture's.
    assert all(s["age_s"] <= 9600 - 7210 + 1.5 for s in still), still


def test_a_capture_wholly_outside_the_window_is_not_listed():
    t0 = 1_800_000_000.0
    second = [dict(r) for r in incident(t0 + 20_000)]
    second[0]["capture_id"] = "cap2"
    rep = report.build(incident(t0) + second, until=t0 + 12_000)
    assert len(rep["captures"]) == 1 and rep["window"]["captures_outside"] == 1
    assert rep["sockets"] == 9


def test_the_text_says_the_window():
    t0 = 1_800_000_000.0
    text = "\n".join(report.render_text(report.build(incident(t0), since=t0 + 3600)))
    start = dt.datetime.fromtimestamp(t0 + 3600).strftime("%Y-%m-%d %H:%M:%S")
    assert f"Window: {start} -> end: records outside it not counted" in text
    assert "Still lingering at the end of the window: 5" in text
    assert "Still lingering at the end of the capture" in "\n".join(
        report.render_text(report.build(incident(t0))))


def run(*args):
    return subprocess.run([sys.executable, "-m", "closewait_trace", "report", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def recorded(tmp_path):
    """The incident, its capture started 3 h ago (so 10m, 2h, 1d6h are
    times in or before it)."""
    t0 = time.time() - 3 * 3600
    path = tmp_path / "cw.jsonl"
    path.write_text("".join(json.dumps(recordfactory.complete(r)) + "\n" for r in incident(t0)))
    return t0, path


@pytest.mark.parametrize("since,expected", [
    ("2h", {"late": 4, "after": 2}),           # t0 + 1 h: the early leak is before it
    ("1h30m", {"late": 4, "after": 2}),
    ("1d6h", {"early": 3, "late": 4, "after": 2}),
    ("10m", {}),                               # nothing reported in the last 10 minutes
])
def test_cli_relative_since(recorded, since, expected):
    _t0, path = recorded
    out = run("--json", "--since", since, str(path))
    assert out.returncode == 0, out.stderr
    assert programs(json.loads(out.stdout)) == expected


def test_cli_absolute_forms_and_until(recorded):
    t0, path = recorded
    iso = dt.datetime.fromtimestamp(t0 + 3600).isoformat(timespec="seconds")
    by_iso = json.loads(run("--json", "--since", iso, str(path)).stdout)
    by_epoch = json.loads(run("--json", "--since", str(t0 + 3600), str(path)).stdout)
    assert programs(by_iso) == programs(by_epoch) == {"late": 4, "after": 2}
    clock = dt.datetime.fromtimestamp(t0 + 9600).strftime("%H:%M:%S")
    if dt.datetime.fromtimestamp(t0 + 9600).date() == dt.datetime.fromtimestamp(t0).date():
        # A time of day is on the first capture's day.
        out = run("--json", "--since", iso, "--until", clock, str(path))
        assert programs(json.loads(out.stdout)) == {"late": 4}, out.stderr
    text = run("--since", iso, "--until", str(t0 + 9600), str(path))
    assert text.returncode == 0 and "Window: " in text.stdout


def test_cli_bad_times_are_one_line(recorded):
    _t0, path = recorded
    for args, word in ((["--since", "yesterday"], "yesterday"),
                       (["--since", "1h", "--until", "2h"], "after --until")):
        out = run(*args, str(path))
        assert out.returncode == 2 and word in out.stderr and "Traceback" not in out.stderr, \
            out.stderr
