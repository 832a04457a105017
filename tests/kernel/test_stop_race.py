"""systemctl stop (SIGTERM) right after the tracer said it is tracing must
end the trace cleanly, with the summary: the service's recording depends on it."""

import signal
import subprocess

import pytest

from tests.kernel.harness import stretch
from tests.kernel.harness import TRACER

pytestmark = pytest.mark.kernel


def test_sigterm_the_moment_tracing_starts_still_writes_the_summary():
    for attempt in range(8):
        proc = subprocess.Popen(TRACER + ["--json", "-t", "1s", "-p", "9"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)     # no pause: as early as a reader can
        rest, err = proc.communicate(timeout=stretch(30))
        assert first.startswith('{"type": "start"'), (first, err)
        assert proc.returncode == 0, (attempt, proc.returncode, err)
        assert rest.splitlines()[-1].startswith('{"type": "summary"'), (attempt, rest)
