"""A gathering worker started before the CLI's imports, for `snapshot`
(cli._snapshot_worker_first); snapshot.run takes it, or starts its own."""

from __future__ import annotations

from typing import Optional

_started = None


def start_worker() -> None:
    global _started
    from closewait_trace.evidence.worker import GatherWorker
    worker = GatherWorker()
    worker.start()
    _started = worker


def take_worker() -> Optional[object]:
    """The worker started early, once (None if none was)."""
    global _started
    worker, _started = _started, None
    return worker
