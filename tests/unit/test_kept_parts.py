"""Linger records' JSON with their shared parts encoded once
(textsafe.KeptParts, records.Shared): the same bytes as json_dumps, line
for line, with whatever the parts hold."""

import io
import random
import socket

from closewait_trace.evidence import diagnosis
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import Endpoints
from closewait_trace.output import records, render, textsafe
from closewait_trace.output.terminal import TerminalSink
from closewait_trace.sockets import owners
from closewait_trace.sockets.tracker import Lingerer
from tests.unit.fakeproc import FakeProc


def plain(rec: dict) -> str:
    return textsafe.safe_line(textsafe.json_dumps(rec, check_circular=False))


# Strings a hostile process can put in its command line or comm: quotes,
# backslashes, controls, DEL, separators, non-ASCII, and JSON's own escapes.
NASTY = ['"', "\\", "\\u0000", '"\\u0000"', "\x00", "\x1b[2J", "\x7f", "\u2028", "\u202e",
         "é", "\U0001f600", "\ud800", ", ", ": ", "}", "{", "plain"]


def value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice(NASTY) + rng.choice(NASTY)
    if kind == 1:
        return rng.randrange(-2**70, 2**70)
    if kind == 2:
        return rng.choice([0.1, 1796429738.665945, -0.0, 1e300, float("nan"), float("inf")])
    if kind == 3:
        return rng.choice([None, True, False])
    if kind in (4, 5):
        return rng.choice(NASTY)
    if kind == 6:
        return [value(rng, depth + 1) for _ in range(rng.randrange(3))]
    items = {rng.choice(NASTY) + str(i): value(rng, depth + 1) for i in range(rng.randrange(4))}
    return records.Shared(items) if kind == 7 else items


def test_lines_are_the_same_bytes_as_json_dumps_for_any_values():
    rng = random.Random(20)
    kept = textsafe.KeptParts(records.Shared, limit=8)
    shared = [value(rng) for _ in range(6)] + [records.Shared({"a": "\x7f"}), records.Shared()]
    for _ in range(3000):
        rec = {"type": "linger"}
        for i in range(rng.randrange(12)):
            key = rng.choice(NASTY) + str(i)
            rec[key] = rng.choice(shared) if rng.random() < 0.3 else value(rng)
        assert kept.line(rec) == plain(rec), rec
        assert len(kept._kept) <= 8


def test_a_shared_part_is_encoded_once_and_kept_by_identity():
    kept = textsafe.KeptParts(records.Shared)
    part = records.Shared({"cmdline": "x" * 100})
    calls = []
    encode = kept._encode
    kept._encode = lambda v: calls.append(v) or encode(v)
    for i in range(5):
        assert kept.line({"i": i, "listener": part, "j": i}) == plain(
            {"i": i, "listener": part, "j": i})
    assert sum(1 for c in calls if c is part) == 1      # once for five records
    other = records.Shared({"cmdline": "y"})          # same shape, another object
    assert kept.line({"listener": other}) == '{"listener": {"cmdline": "y"}}'


def lingerer_with_listener(tmp_path, rport: int) -> Lingerer:
    fake = FakeProc(tmp_path)
    fake.process(10, comm="serv\x7fer", threads={10: ("S", "232 0x4 0x7ff 0x1", "ep_poll")})
    fake.tcp(10, socket.AF_INET, "0.0.0.0", 5555, "0.0.0.0", 0, tcpstates.LISTEN, 800)
    fake.fd(10, 3, 800)
    fake.tcp(10, socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", rport,
             tcpstates.CLOSE_WAIT, 900 + rport, rx=1)
    ep = Endpoints(socket.AF_INET, "127.0.0.1", 5555, "127.0.0.1", rport)
    fake.fd(10, 5, 900 + rport, cloexec=True)
    own = owners.resolve([ep], fake.root)[ep]
    l = Lingerer(endpoints=ep, enter_ns=1_000, skaddr=1)
    l.ownership = own
    l.diagnosis = diagnosis.gather(own, fake.root, machine="x86_64")
    l.code = records.Shared(records.code_unknown("not here", "nor \x7f here"))
    return l


def test_the_json_sink_writes_linger_records_as_json_dumps(tmp_path):
    l = lingerer_with_listener(tmp_path, 40000)
    assert l.ownership.listener is not None            # the part under test
    recs = [records.linger(l, 1_700_000_000.0 + i, 2_000_000_000 + i, update=bool(i % 2))
            for i in range(3)]
    assert type(recs[0]["listener"]) is records.Shared
    assert recs[0]["listener"] is recs[1]["listener"]   # one per listener and answer
    out = io.StringIO()
    sink = TerminalSink(True, render.TextRenderer(), stream=out)
    for rec in recs:
        sink.emit(rec)
    assert out.getvalue() == "".join(plain(rec) + "\n" for rec in recs)
    assert "\x7f" not in out.getvalue() and "\\u007f" in out.getvalue()
