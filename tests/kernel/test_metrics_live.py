"""--metrics scraped by a real Prometheus server during the seed scenario."""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from tests.kernel.harness import Tracer, children_of, free_port, wait_until

pytestmark = pytest.mark.kernel


def http_get(url: str, timeout=5.0) -> bytes:
    return urllib.request.urlopen(url, timeout=timeout).read()


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
            self.proc.wait(timeout=20)
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

    server = subprocess.Popen(["socat", f"tcp4-listen:{port},reuseaddr,fork",
                               "system:kill -STOP $SOCAT_PID"])
    procs.append(server)
    wait_until(lambda: f":{port} " in subprocess.run(
        ["ss", "-Htln"], capture_output=True, text=True).stdout, what="socat listening")
    for _ in range(5):
        subprocess.run(["socat", "-T", "1", "-u", f"tcp4:127.0.0.1:{port}", "-"],
                       check=True, timeout=10)
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
                          capture_output=True, timeout=30)
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
