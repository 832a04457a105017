"""TCP state names and which transitions run in the process's own context."""

from closewait_trace.kernel import tcpstates


def test_process_context_transitions():
    assert tcpstates.runs_in_process_context(tcpstates.CLOSE_WAIT, tcpstates.LAST_ACK)
    assert not tcpstates.runs_in_process_context(tcpstates.ESTABLISHED, tcpstates.CLOSE_WAIT)
