"""Output records built from kernel facts."""

from closewait_trace.output import records


def test_histogram_buckets():
    slots = [0] * 64
    slots[0], slots[1], slots[11] = 2, 3, 1
    assert records.histogram_buckets(slots) == [
        {"from_us": 0, "to_us": 1, "count": 2},
        {"from_us": 1, "to_us": 2, "count": 3},
        {"from_us": 1024, "to_us": 2048, "count": 1}]
