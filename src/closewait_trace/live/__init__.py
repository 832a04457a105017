"""The live trace and the snapshot: the session's wiring (session), the loop (tracer), and `snapshot`."""
