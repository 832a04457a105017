"""The live trace and the snapshot: the loop, the pure tracker, ages from tcp_info, filters, and the sinks (recording, metrics)."""
