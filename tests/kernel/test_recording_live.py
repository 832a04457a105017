"""Recording for real: kill -9, replay equals live, rotation, a full disk."""

import json
import os
import shutil
import signal
import stat
import subprocess
import time

import pytest

from tests.kernel.harness import (TRACER, Tracer, children_of, connect_and_close, free_port,
                                  ss_close_wait, start_holding_server, stretch,
                                  tracer_process, wait_until)

# The program is named by its executable (what /proc/PID/exe links to).
SOCAT = os.path.realpath(shutil.which("socat"))

pytestmark = pytest.mark.kernel


def cli(*args, **kw):
    return subprocess.run(TRACER + list(args), capture_output=True, text=True, timeout=stretch(60), **kw)


def test_seed_scenario_recorded_killed_and_reported(tmp_path, procs, kernel_path):
    port = free_port()
    path = tmp_path / "seed.jsonl"
    tracer = Tracer(["-p", str(port), "-t", "1s", "-w", str(path)]).start()
    procs.append(tracer)
    server = subprocess.Popen(["socat", f"tcp4-listen:{port},reuseaddr,fork",
                               "system:kill -STOP $SOCAT_PID"])
    procs.append(server)
    wait_until(lambda: f":{port} " in subprocess.run(["ss", "-Htln"], capture_output=True,
                                                     text=True).stdout, what="socat")
    for _ in range(5):
        subprocess.run(["socat", "-T", "1", "-u", f"tcp4:127.0.0.1:{port}", "-"], check=True,
                       timeout=stretch(10))
    lingers = tracer.wait_for(lambda r: r["type"] == "linger", count=5, timeout=15)
    children = set(children_of(server.pid))
    time.sleep(stretch(1.2))              # records reach the file within a second
    tracer.proc.send_signal(signal.SIGKILL)
    tracer.proc.wait()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    result = cli("report", "--json", "--by", "pid,program,cause", str(path))
    assert result.returncode == 0, result.stderr
    rep = json.loads(result.stdout)
    assert rep["sockets"] == 5
    pids = {row["pid"] for row in rep["by_pid"]}
    assert pids == {r["owners"][0]["pid"] for r in lingers} and pids <= children
    assert all(row["comm"] == "socat" and row["count"] == 1 for row in rep["by_pid"])
    # The five children of one listener are one program, stopped.
    assert [(r["program"], r["processes"], r["count"], r["causes"]) for r in rep["by_program"]] \
        == [(f"socat [{SOCAT}]", 5, 5, {"stopped": 5})]
    assert [r["cause"] for r in rep["by_cause"]] == ["stopped"]
    assert len(rep["still_lingering"]) == 5
    # Linger times: at least the 1s threshold, no more than the whole capture.
    span = rep["captures"][0]["end_ts"] - rep["captures"][0]["start_ts"]
    assert all(1.0 <= row["longest_s"] <= span + 1 for row in rep["by_pid"])
    assert rep["losses"]["unclean_ends"] == 1
    text = cli("report", str(path))
    assert text.returncode == 0
    assert f"socat [{SOCAT}] (5 processes)" in text.stdout
    assert "ended without a summary" in text.stdout


def run_text_tracer(args, workload, settle=1.5):
    with tracer_process(args, text=True) as proc:
        # The banner says the tracer is ready; with -q it goes to stderr.
        stream = proc.stderr if "-q" in args else proc.stdout
        first = stream.readline()
        assert first.startswith("Tracing TCP sockets lingering in CLOSE_WAIT"), first
        workload()
        time.sleep(settle)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=stretch(15))
        # Read through the same buffered streams (communicate() would skip
        # what readline() already buffered).
        out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err
    return (out if "-q" in args else first + out), (first + err if "-q" in args else err)


def test_replay_prints_what_the_live_run_printed(tmp_path, procs):
    port = free_port()
    path = tmp_path / "run.jsonl"
    server = start_holding_server(port)
    procs.append(server)

    def workload():
        connect_and_close(port, 3, payload=b"abc")

    live, _ = run_text_tracer(["-p", str(port), "-t", "300ms", "-w", str(path)], workload)
    assert live.count(" LINGER ") == 3
    replayed = cli("-r", str(path))
    assert replayed.returncode == 0 and replayed.stderr == ""
    # A replay does not pass for a live trace: its own banner and summary...
    out = replayed.stdout
    assert "Tracing" not in out and "Ctrl-C" not in out
    # (The file on a line of its own when the banner would pass 80 columns.)
    banner = out.split("Shown:")[0].splitlines()
    assert banner[0].startswith("Replay of") and str(path) in banner[0] + banner[1], banner
    assert "Shown: everything" in out
    assert "Replay summary (counts what was shown, no filters)" in out
    assert "shown: 3 LINGER, 0 CHANGE, 0 CLOSED" in out
    # ...around the same table, and the same recorded summary, line for line.
    def table(text):
        lines = text.splitlines()
        start = next(i for i, l in enumerate(lines) if l.startswith("TIME "))
        end = lines.index("", start)
        summary = next(i for i, l in enumerate(lines) if l.startswith("Summary after"))
        return lines[start:end], lines[summary:lines.index("", summary) if "" in lines[summary:]
                                       else None]
    live_rows, live_summary = table(live)
    replay_rows, replay_summary = table(out)
    assert len(live_rows) == 1 + 6 and replay_rows == live_rows
    assert replay_summary[:len(live_summary)] == live_summary
    as_json = cli("-r", str(path), "--json")
    kinds = [json.loads(l)["type"] for l in as_json.stdout.splitlines()]
    assert kinds.count("linger") == 3 and kinds[0] == "start" and kinds[-1] == "summary"


def test_live_rotation_produces_a_readable_set(tmp_path, procs):
    port = free_port()
    path = tmp_path / "rot.jsonl"
    server = start_holding_server(port)
    procs.append(server)

    def workload():
        for _ in range(6):
            connect_and_close(port, 2)
            time.sleep(0.7)

    run_text_tracer(["-p", str(port), "-t", "200ms", "-w", str(path), "-C", "4k", "-q"],
                    workload, settle=1.0)
    parts = sorted(p for p in os.listdir(tmp_path) if p.startswith("rot.jsonl"))
    assert len(parts) >= 2
    for p in parts:
        assert stat.S_IMODE(os.stat(tmp_path / p).st_mode) == 0o600
    replayed = cli("-r", str(path), "--json")
    lingers = [json.loads(l) for l in replayed.stdout.splitlines()
               if json.loads(l)["type"] == "linger"]
    assert len(lingers) == 12 == len(ss_close_wait(port))


def test_full_disk_keeps_tracing_and_counts(tmp_path, procs):
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        port = free_port()
        server = start_holding_server(port)
        procs.append(server)
        with Tracer(["-p", str(port), "-t", "200ms", "-w", str(mnt / "cw.jsonl")]) as tracer:
            # Fill what is left of the disk once the header is on it.
            fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)
            connect_and_close(port, 5)
            tracer.wait_for(lambda r: r["type"] == "linger", count=5)
            summary = tracer.stop()
            assert summary["write_errors"] >= 5
            assert tracer.stderr.count("cannot write") == 1
            assert "Traceback" not in tracer.stderr
            # What did reach the file is still a readable recording.
            result = cli("report", str(mnt / "cw.jsonl"))
            assert result.returncode == 0, result.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_write_refuses_symlink_and_existing_file(tmp_path):
    target = tmp_path / "target"
    target.write_text("keep me")
    (tmp_path / "link").symlink_to(target)
    result = cli("-w", str(tmp_path / "link"), "-q")
    assert result.returncode == 7
    assert "symbolic link" in result.stderr and result.stderr.count("\n") == 1
    result = cli("-w", str(target), "-q")
    assert result.returncode == 7 and "--force" in result.stderr
    assert target.read_text() == "keep me"


def test_write_refuses_a_link_in_another_users_directory(tmp_path):
    """Review finding F6, on the command line: nobody's directory holds a
    link to root's; -w through it with --force is one line and exit 7,
    before anything is traced, and root's files there are untouched."""
    import tempfile
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "cw.jsonl.3").write_text("keep me")
    shared = tempfile.mkdtemp(prefix="cw-sticky-", dir="/tmp")
    try:
        os.chmod(shared, 0o1777)
        theirs = os.path.join(shared, "att")
        subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "/usr/bin/python3", "-c", f"import os\nos.mkdir({theirs!r})\n"
                        f"os.symlink({str(victim)!r}, {theirs + '/d'!r})"], check=True)
        result = cli("-q", "-w", os.path.join(theirs, "d", "cw.jsonl"), "--force")
        assert result.returncode == 7, result.stderr
        assert result.stderr.splitlines() == [line for line in result.stderr.splitlines()
                                              if line.startswith("closewait-trace: ")]
        assert f"refusing to record in {theirs}/d: {theirs}: it is owned by uid 65534" \
            in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert os.listdir(victim) == ["cw.jsonl.3"]
        assert (victim / "cw.jsonl.3").read_text() == "keep me"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_planted_fifo_stops_the_recording_not_the_trace(procs):
    """In a sticky shared directory another user plants a FIFO at the next
    part's name: the tracer neither hangs nor dies; the recording stops with
    one line, the trace goes on, and the exit code at the end is 7."""
    import shutil
    import tempfile
    sticky = tempfile.mkdtemp(prefix="cw-sticky-", dir="/tmp")
    try:
        os.chmod(sticky, 0o1777)
        path = os.path.join(sticky, "cw.jsonl")
        port = free_port()
        server = start_holding_server(port)
        procs.append(server)
        tracer = Tracer(["-p", str(port), "-t", "200ms", "-w", path, "-C", "1k"]).start()
        procs.append(tracer)
        subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        "mkfifo", "-m", "666", path + ".1"], check=True, timeout=stretch(30))
        connect_and_close(port, 6)
        tracer.wait_for(lambda r: r["type"] == "linger", count=6)
        tracer.settle(1.5)                  # batches flushed: the rotation was tried
        connect_and_close(port, 2)          # the trace goes on after it
        tracer.wait_for(lambda r: r["type"] == "linger", count=8)
        tracer.proc.send_signal(signal.SIGINT)
        rc = tracer.proc.wait(timeout=stretch(30))   # the old code hung in open() here
        stderr = tracer.proc.stderr.read()
        assert rc == 7, stderr
        stopped = [l for l in stderr.splitlines() if "recording stopped at part 1" in l]
        assert len(stopped) == 2 and "a FIFO" in stopped[0], stderr   # at once, and at exit
        assert "Traceback" not in stderr and "Bad file descriptor" not in stderr
        assert stat.S_ISFIFO(os.lstat(path + ".1").st_mode)
        result = cli("report", "--json", path)    # what came before is readable
        assert result.returncode == 0, result.stderr
        assert f"skipped {path}.1: it is a FIFO" in result.stderr
    finally:
        shutil.rmtree(sticky, ignore_errors=True)
