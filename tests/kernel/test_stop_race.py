"""systemctl stop (SIGTERM) right after the tracer said it is tracing must
end the trace cleanly, with the summary: the service's recording depends on it."""

import signal

import pytest

from tests.kernel.harness import stretch, tracer_process

pytestmark = pytest.mark.kernel


def test_sigterm_the_moment_tracing_starts_still_writes_the_summary():
    for attempt in range(8):
        with tracer_process(["--json", "-t", "1s", "-p", "9"], text=True) as proc:
            first = proc.stdout.readline()
            proc.send_signal(signal.SIGTERM)     # no pause: as early as a reader can
            rest, err = proc.communicate(timeout=stretch(30))
        assert first.startswith('{"type": "start"'), (first, err)
        assert proc.returncode == 0, (attempt, proc.returncode, err)
        assert rest.splitlines()[-1].startswith('{"type": "summary"'), (attempt, rest)
