"""The stop of a tracer whose process is about to end runs at a raised
priority (STOP_NICE): raising it needs CAP_SYS_NICE, so this is a root test
(as user nobody the call is refused). The tracer is the unit tests' World:
a fake probe, a fake /proc, a list sink."""

import os
import signal

import pytest

from tests.unit.test_loop import World

pytestmark = pytest.mark.root


def test_the_stop_of_a_process_about_to_end_runs_above_a_saturating_workload(tmp_path):
    """SIGINT -> exit <= 0.2 s under saturation (issue 20): the exit's few
    ms of work waited for a CPU behind the workload (0.10-0.26 s at load
    average 6-7). From the stop signal the stopping thread runs at
    STOP_NICE, when the process ends after run() (cli's quick exit); a
    tracer used otherwise (a test, a library) keeps its priority."""
    from closewait_trace.live import tracer as tracer_module
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        w = World(tmp_path / "kept")
        w.tracer.start()
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            assert os.getpriority(os.PRIO_PROCESS, 0) == before
            w.tracer.run()
        finally:
            w.tracer.restore_signals()
        w = World(tmp_path / "ending")
        w.probe.release_for_exit = lambda: None
        w.tracer.exit_after_run = True
        w.tracer.start()
        try:
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
            assert os.getpriority(os.PRIO_PROCESS, 0) < before
            assert os.getpriority(os.PRIO_PROCESS, 0) == tracer_module.STOP_NICE
            w.tracer.run()
        finally:
            w.tracer.restore_signals()
        assert w.sink.records[-1]["type"] == "summary"
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, before)
