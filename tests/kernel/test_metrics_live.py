"""--metrics scraped by a real Prometheus server during the seed scenario."""

import json
import os
import shutil
import signal
import socket
import sys
import subprocess
import urllib.parse
import urllib.request

import pytest

from tests.kernel.harness import stretch
from tests.kernel.harness import start_seed_scenario, Tracer, children_of, free_port, wait_until

pytestmark = pytest.mark.kernel


def http_get(url: str, timeout=5.0) -> bytes:
    return urllib.request.urlopen(url, timeout=stretch(timeout)).read()


class Prometheus:
    """Debian's prometheus on loopback, scraping one target every second."""

    def __init__(self, tmp_path, target: str):
        self.port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: closewait\n    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = open(tmp_path / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._ready, timeout=60, what="prometheus ready")

    def _ready(self) -> bool:
        try:
            return b"Ready" in http_get(f"http://127.0.0.1:{self.port}/-/ready")
        except OSError:
            return False

    def query(self, expr: str) -> list:
        url = (f"http://127.0.0.1:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": expr}))
        reply = json.loads(http_get(url))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def scalar(self, expr: str):
        """The single value of an instant vector, None when it is empty."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=stretch(20))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path):
    if not shutil.which("prometheus") and os.environ.get("CI") != "true":
        pytest.skip("prometheus not installed (scripts/setup.sh test installs it)")
    started = []

    def start(target):
        p = Prometheus(tmp_path, target)
        started.append(p)
        return p
    yield start
    for p in started:
        p.stop()


def test_real_prometheus_scrapes_the_seed_scenario(procs, prometheus_for):
    port = free_port()
    metrics_port = free_port()
    tracer = Tracer(["-p", str(port), "-t", "1s", "--metrics", str(metrics_port)]).start()
    procs.append(tracer)
    prom = prometheus_for(f"127.0.0.1:{metrics_port}")
    # New targets reach the scraper every 5 s: wait for the first scrape.
    wait_until(lambda: prom.scalar('up{job="closewait"}') == 1.0, timeout=60,
               what="first scrape")
    before = prom.scalar("closewait_duration_seconds_count")
    assert before == 0.0

    server, entered = start_seed_scenario(port, procs)
    tracer.wait_for(lambda r: r["type"] == "linger", count=5, timeout=15)

    lingering = 'sum(closewait_lingering_sockets{comm="socat"})'
    wait_until(lambda: prom.scalar(lingering) == 5.0, timeout=30, what="5 socat sockets scraped")
    series = prom.query('closewait_lingering_sockets{comm="socat"}')
    assert [s["metric"]["port"] for s in series] == [str(port)]
    assert [s["metric"]["side"] for s in series] == ["server"]
    assert prom.scalar('closewait_oldest_lingering_seconds{comm="socat"}') >= 1.0
    assert prom.scalar('closewait_lingered_total{cause="stopped"}') == 5.0
    assert prom.scalar("closewait_entered_total") == 5.0

    # promtool's own lint of what the tracer serves.
    body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
    lint = subprocess.run(["promtool", "check", "metrics"], input=body,
                          capture_output=True, timeout=stretch(30))
    assert lint.returncode == 0, lint.stdout + lint.stderr

    for pid in children_of(server.pid):
        os.kill(pid, signal.SIGKILL)
    tracer.wait_for(lambda r: r["type"] == "closed", count=5, timeout=10)
    wait_until(lambda: prom.scalar("closewait_duration_seconds_count") == before + 5,
               timeout=30, what="5 durations scraped")
    wait_until(lambda: prom.scalar(lingering) == 0.0, timeout=30, what="gauge back to 0")
    # Each stay lasted more than a second: the histogram's buckets say so.
    assert prom.scalar('closewait_duration_seconds_bucket{le="0.524288"}') == 0.0
    assert prom.scalar('closewait_duration_seconds_bucket{le="+Inf"}') == 5.0
    tracer.stop(signal.SIGTERM)


# Accepts N connections; each goes to a child of its own, renamed w000..wN
# (prctl PR_SET_NAME), which holds it and never reads or closes; the parent
# keeps no copy. Prints "ready" once listening, "held" once all are handed out.
NAMED_HOLDERS = r"""
import ctypes, os, socket, sys, time
libc = ctypes.CDLL(None)
n, port = int(sys.argv[1]), int(sys.argv[2])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen(1024)
print("ready", flush=True)
for i in range(n):
    conn, _ = srv.accept()
    if os.fork() == 0:
        srv.close()
        libc.prctl(15, f"w{i:03d}".encode(), 0, 0, 0)      # PR_SET_NAME
        while True:
            time.sleep(3600)
    conn.close()
print("held", flush=True)
while True:
    time.sleep(3600)
"""


def test_cardinality_cap_with_500_real_process_names(procs):
    from prometheus_client.parser import text_string_to_metric_families
    from closewait_trace.output.metrics import MAX_SERIES
    port, metrics_port = free_port(), free_port()
    tracer = Tracer(["-p", str(port), "-t", "500ms", "--metrics", str(metrics_port)]).start()
    procs.append(tracer)
    server = subprocess.Popen([sys.executable, "-c", NAMED_HOLDERS, "500", str(port)],
                              stdout=subprocess.PIPE, text=True)
    procs.append(server)
    assert server.stdout.readline().strip() == "ready"
    clients = []
    for _ in range(500):
        c = socket.create_connection(("127.0.0.1", port))
        clients.append(c)
    assert server.stdout.readline().strip() == "held"
    for c in clients:
        c.close()

    def gauge():
        text = http_get(f"http://127.0.0.1:{metrics_port}/metrics").decode()
        return [s for fam in text_string_to_metric_families(text)
                for s in fam.samples if s.name == "closewait_lingering_sockets"]
    wait_until(lambda: sum(s.value for s in gauge()) == 500, timeout=60,
               what="500 sockets in the metrics")
    samples = gauge()
    assert len(samples) == MAX_SERIES + 1
    names = {s.labels["comm"] for s in samples}
    assert "(other processes)" in names and len(names) == MAX_SERIES + 1
    assert all(s.labels["side"] == "server" and s.labels["port"] == str(port)
               for s in samples if s.labels["comm"] != "(other processes)")
    other = [s for s in samples if s.labels["comm"] == "(other processes)"]
    assert other[0].value == 500 - MAX_SERIES
    tracer.stop()
