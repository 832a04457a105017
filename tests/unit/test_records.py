"""Output records built from kernel facts."""

from closewait_trace.output import records


def test_histogram_buckets():
    slots = [0] * 64
    slots[0], slots[1], slots[11] = 2, 3, 1
    assert records.histogram_buckets(slots) == [
        {"from_us": 0, "to_us": 1, "count": 2},
        {"from_us": 1, "to_us": 2, "count": 3},
        {"from_us": 1024, "to_us": 2048, "count": 1}]


def test_the_listener_parts_kept_hold_a_bounded_number_of_holders():
    """A listener's part is kept once per listener; each holds an entry per
    holder of the listener. A user's 200 listeners shared by 1,000 forks
    each: the parts kept hold at most LISTENER_HOLDERS_KEPT entries in all,
    and a listener with more holders than an eighth of that is not kept
    with them: only the last such, alone, so that its sockets share it
    (made again for each record, it cost 14 ms a record)."""
    import socket

    from closewait_trace.kernel.events import Endpoints
    from closewait_trace.sockets import owners
    from closewait_trace.sockets.tcprow import TcpRow
    records._listener_parts.clear()
    forks = tuple(owners.Holder(1000 + i, "f", 3, "S", 1, 1000, "f") for i in range(1000))
    for port in range(200):
        row = TcpRow(Endpoints(socket.AF_INET, "0.0.0.0", 2000 + port, "0.0.0.0", 0), 10,
                     128, 0, 1000, 5000 + port)
        own = owners.Ownership(kind=owners.OWNER_FD, listener=row, listener_holders=forks[:])
        part = records.listener_part(own)
        assert len(part["owners"]) == 1000
        assert records.listener_part(own) is part or len(records._listener_parts) == 0
        kept = sum(len(holders) for _row, holders, _part in records._listener_parts.values())
        assert kept <= records.LISTENER_HOLDERS_KEPT
    many = tuple(owners.Holder(1, "f", 3 + i, "S", 1, 1000, "f")
                 for i in range(records.LISTENER_HOLDERS_KEPT // 8 + 1))
    own = owners.Ownership(kind=owners.OWNER_FD, listener=row, listener_holders=many)
    big = records.listener_part(own)
    assert records.listener_part(own) is big
    assert all(part is not big for _row, _holders, part in records._listener_parts.values())
    other = owners.Ownership(kind=owners.OWNER_FD, listener=row,
                             listener_holders=many[1:] + many[:1])
    assert records.listener_part(other) is not big                 # the last such, alone
    assert records.listener_part(own) is not big
    records._listener_parts.clear()
