"""--all's lines built straight from the kernel's raw events (issue 20).

A busy host makes hundreds of thousands of TCP state transitions a second,
and each went through a KernelEvent, an Endpoints, a record dict, json.dumps
or the text renderer, and a write of its own: 15-25 us of Python per
event, where the kernel spends about 2. Here a batch of raw rows (tuples
unpacked from struct cw_event, see events.EventLayout) becomes one string:
a template per line, the address, command and state texts cached, the wall
clock's text cached per second, no dict.

The output is byte for byte what records.transition() rendered by
render.TextRenderer or json.dumps gives for the same event
(tests/unit/test_transition_golden.py compares both against lines written
by the code before this one); records.transition() stays the definition.
"""

from __future__ import annotations

import json
import math
import socket

from closewait_trace.durations import format_age
from closewait_trace.kernel import tcpstates
from closewait_trace.kernel.events import (R_COMM, R_DADDR, R_DPORT, R_DURATION, R_FAMILY,
                                           R_NEW, R_OLD, R_PID, R_SADDR, R_SPORT, R_TS,
                                           comm_text, format_address)
from closewait_trace.output import records, render, textsafe

_AF_INET = socket.AF_INET
_LISTEN, _SYN_RECV = tcpstates.LISTEN, tcpstates.SYN_RECV
_IN_PROCESS = tcpstates.PROCESS_CONTEXT
_STATE = [tcpstates.name(i) for i in range(256)]          # states are u8
_STATE_JSON = [json.dumps(s) for s in _STATE]
CACHE_MAX = 4096            # entries per text cache; cleared when full
# JsonLines slices a row's endpoint fields at once: they must be adjacent.
assert (R_SADDR, R_DADDR, R_SPORT, R_DPORT, R_FAMILY) == tuple(range(R_SADDR, R_FAMILY + 1))


# A duration of d ns is written as repr(round(d / 1e9, 9)); below 4e15 ns
# (d / 1e9 < 2**22, where a double's spacing is under 1e-9) the rounding
# gives back d / 1e9 itself: d / 1e9 is the double nearest d * 1e-9, which
# is the 9-place decimal round() rounds to. (Checked in
# tests/unit/test_transition_golden.py on random and edge values; above
# the bound round() is kept: not shown to be a no-op there.)
_DURATION_EXACT = 4 * 10**15


def _exact_second(whole: float) -> bool:
    """Within a second of [2**30, 2**31) a double's spacing is 2**-22 s:
    fractions times 1e6 are k * 15625 / 65536, so round(frac * 1e6) ties
    exactly where the exact product does and otherwise lies at least
    1/65536 from a tie: it is the microsecond round(ts, 6) rounds to (half
    to even, on the exact value); and each 6-place decimal there has its
    own double, whose shortest repr is that decimal without trailing
    zeros. So repr(round(ts, 6)) is f"{int(whole)}.{us:06d}" stripped."""
    return 1073741824.0 <= whole < 2147483647.0


def _bounded(cache: dict) -> dict:
    if len(cache) >= CACHE_MAX:
        cache.clear()
    return cache


class JsonLines:
    """Transition records as --json writes them (json.dumps of
    records.transition(), then textsafe.safe_line), or, compact, as a
    recording (-w) writes them (textsafe.json_dumps with separators
    (",", ":"), no safe_line: json.dumps' ASCII escaping is the
    recording's)."""

    def __init__(self, compact: bool = False):
        self.clock = records.WallClock()
        self.compact = compact
        self._addr: dict = {}       # raw address -> (family, its JSON string)
        self._comm: dict = {}       # raw comm -> JSON string (line-safe unless compact)
        self._conn: dict = {}       # (saddr, daddr, sport, dport, family) -> the
                                    #   line's middle (_endpoints)
        c, s = (":", ",") if compact else (": ", ", ")
        self._c, self._s = c, s
        # The line's fixed pieces, between the values.
        self._p = (f'{{"type"{c}"transition"{s}"ts"{c}', f'{s}"time"{c}"',
                   f'"{s}', f'{s}"prev_state_s"{c}', f'{s}"task"{c}',
                   f'{s}"peer_known"{c}')
        self._task_head = f'{{"pid"{c}'
        self._task_mid = f'{s}"comm"{c}'
        self._pairs = None          # the state-pair table, at the first batch

    def _address(self, family: int, raw: bytes) -> str:
        text = json.dumps(format_address(family, raw))
        _bounded(self._addr)[raw] = (family, text)
        return text

    def _task_comm(self, raw: bytes) -> str:
        text = self._comm.get(raw)
        if text is None:
            # safe_line escapes character by character: what it would do
            # to the whole line it does to this piece (the rest is ASCII).
            text = json.dumps(comm_text(raw))
            if not self.compact:
                text = textsafe.safe_line(text)
            _bounded(self._comm)[raw] = text
        return text

    def _endpoints(self, key: tuple) -> str:
        """The line's middle from the family to the remote port for one
        connection's (saddr, daddr, sport, dport, family): a connection's
        transitions all share it (LISTEN->SYN_RECV with no peer writes the
        addresses it has too; only peer_known says so)."""
        saddr, daddr, sport, dport, family = key
        addr = self._addr
        hit = addr.get(saddr)
        laddr = hit[1] if hit is not None and hit[0] == family else self._address(family, saddr)
        hit = addr.get(daddr)
        raddr = hit[1] if hit is not None and hit[0] == family else self._address(family, daddr)
        c, s = self._c, self._s
        text = (f'"family"{c}"{"ipv4" if family == _AF_INET else "ipv6"}"{s}'
                f'"laddr"{c}{laddr}{s}"lport"{c}{sport}{s}'
                f'"raddr"{c}{raddr}{s}"rport"{c}{dport}{s}')
        _bounded(self._conn)[key] = text
        return text

    def lines(self, rows, offset_ns: int) -> str:
        """One string: the lines of all rows, each ending in a newline."""
        return "".join(self.line_list(rows, offset_ns))

    def line_list(self, rows, offset_ns: int) -> list:
        """The lines of all rows, each ending in a newline."""
        out = []
        append = out.append
        clock = self.clock
        conn = self._conn
        endpoints = self._endpoints
        task_comm = self._task_comm
        pairs = self._pairs
        if pairs is None:
            pairs = self._pairs = _json_pairs(self.compact)
        p0, p1, p2, p3, p4, p5 = self._p
        task_head, task_mid = self._task_head, self._task_mid
        modf = math.modf
        last_whole = None
        head = tail = whole_dot = ""
        for r in rows:
            ts = (r[R_TS] + offset_ns) / 1e9
            # records.WallClock.text(ts), inline: the text up to the second made
            # once per second. Within a second of [2**30, 2**31) (2004 to
            # 2038) the "ts" value's repr(round(ts, 6)) is made from the
            # same microseconds (_exact_second says why).
            frac, whole = modf(ts)
            us = round(frac * 1e6)
            if whole != last_whole or us >= 1_000_000 or us < 0:
                time_text = clock.text(ts)
                ts_text = repr(round(ts, 6))
                if 0 <= us < 1_000_000 and _exact_second(whole):
                    last_whole = whole
                    head, tail = clock._head, clock._tail
                    whole_dot = f"{int(whole)}."
                else:
                    last_whole = None
            else:
                u = f"{us:06d}"
                time_text = f"{head}{u}{tail}"
                ts_text = f"{whole_dot}{u.rstrip('0') or '0'}"
            key = r[R_SADDR:R_FAMILY + 1]
            ends = conn.get(key)
            if ends is None:
                ends = endpoints(key)
            states, in_process, listen_syn = pairs[r[R_OLD] << 8 | r[R_NEW]]
            d = r[R_DURATION]
            if not d:
                prev = "null"
            elif d < _DURATION_EXACT:
                prev = repr(d / 1e9)
            else:
                prev = repr(round(d / 1e9, 9))
            if in_process:
                task = f'{task_head}{r[R_PID]}{task_mid}{task_comm(r[R_COMM])}}}'
            else:
                task = "null"
            append(f'{p0}{ts_text}{p1}{time_text}{p2}{ends}{states}{p3}{prev}{p4}{task}'
                   f'{p5}{"false" if listen_syn and r[R_DPORT] == 0 else "true"}}}\n')
        return out


# (old << 8 | new) -> ('"oldstate": ..., "newstate": ...', named task?, LISTEN->SYN_RECV?)
_JSON_PAIRS: dict = {}      # compact? -> the table


def _json_pairs(compact: bool) -> list:
    """The table above, made at the first --all JSON batch: its 65,536
    entries hold 11 MB and cost about 20 ms to build, which a trace without
    --all (the cli imports this module) must not carry nor wait for."""
    table = _JSON_PAIRS.get(compact)
    if table is None:
        c, s = (":", ",") if compact else (": ", ", ")
        table = _JSON_PAIRS[compact] = [
            (f'"oldstate"{c}{_STATE_JSON[o]}{s}"newstate"{c}{_STATE_JSON[n]}',
             (o, n) in _IN_PROCESS, o == _LISTEN and n == _SYN_RECV)
            for o in range(256) for n in range(256)]
    return table


class TextLines:
    """Transition lines as render.TextRenderer writes them (its columns,
    its clock, its escaping), then textsafe.safe_line."""

    def __init__(self, renderer: "render.TextRenderer"):
        self.r = renderer
        self._addr: dict = {}       # (family, raw, port digits) -> (text, width)
        self._change: dict = {}     # (old, new) -> the EVENT cell, padded
        self._owner: dict = {}      # (pid, raw comm) -> OWNER cell
        self._conn: dict = {}       # (saddr, daddr, sport, dport, family) -> both
                                    #   endpoint cells
        self._pairs: dict = {}      # old << 8 | new -> _pair()

    def _endpoint(self, family: int, raw: bytes, port: int) -> str:
        """render.hostport(address, port, the column) padded to the column.
        What precedes ':PORT' depends only on the address and the number of
        digits of the port: it is cached with its width."""
        p = str(port)
        key = (family, raw, len(p))
        hit = self._addr.get(key)
        if hit is None:
            r = self.r
            full = render.hostport(format_address(family, raw), port,
                                   None if r.wide else r.addr_width)
            head = full[:-(len(p) + 1)]
            hit = (head, textsafe.width_of_escaped(head))
            _bounded(self._addr)[key] = hit
        head, head_width = hit
        gap = self.r.addr_width - head_width - 1 - len(p)
        return f"{head}:{p}{' ' * gap}" if gap > 0 else f"{head}:{p}"

    def _event(self, old: int, new: int) -> str:
        cell = self._change.get((old, new))
        if cell is None:
            o, n = _STATE[old], _STATE[new]
            change = f"{render._SHORT.get(o, textsafe.escape(o))}>{render._SHORT.get(n, textsafe.escape(n))}"
            change = textsafe.cut(change, self.r.event_width)
            cell = f"{change:<{self.r.event_width}}"
            _bounded(self._change)[(old, new)] = cell
        return cell

    def _pair(self, pair: int) -> tuple:
        """(old << 8 | new) -> (the EVENT cell, its task named?, LISTEN->SYN_RECV?)."""
        old, new = pair >> 8, pair & 0xff
        hit = (textsafe.safe_line(self._event(old, new)), (old, new) in _IN_PROCESS,
               old == _LISTEN and new == _SYN_RECV)
        self._pairs[pair] = hit             # at most 65,536 pairs
        return hit

    def _task(self, pid: int, raw: bytes) -> str:
        key = (pid, raw)
        cell = self._owner.get(key)
        if cell is None:
            cell = textsafe.safe_line(
                self.r._owner(render.who({"pid": pid, "comm": comm_text(raw)})))
            _bounded(self._owner)[key] = cell
        return cell

    def lines(self, rows, offset_ns: int) -> str:
        r = self.r
        w = r.addr_width
        clock = r.clock
        cell_of = clock.cell
        clock_width = clock.width
        # The clock style's cell changes only with the whole second
        # (Clock.cell caches it so): while an event's time, rounded to the
        # microsecond, stays within the second of the last cell made, the
        # padded cell is reused without rounding nor calling Clock.cell.
        per_second = clock.style == "clock"
        pad = textsafe.pad
        safe = textsafe.safe_line
        endpoint = self._endpoint
        pairs = self._pairs
        pair_of = self._pair
        task = self._task
        no_peer = pad(render.PEER_NOT_GIVEN, w)
        conn = self._conn
        out = []
        append = out.append
        padded_cell = None
        low = high = 0.0            # [low, high): times whose cell is padded_cell
        for row in rows:
            x = (row[R_TS] + offset_ns) / 1e9
            if not low <= x < high:
                ts = round(x, 6)
                cell, before = cell_of(ts)
                out.extend(map(safe, before))
                padded_cell = safe(pad(cell, clock_width))
                if per_second and clock._second is not None and clock._second == int(ts) >= 0:
                    # round(x, 6) stays in this second below second + 0.9999995.
                    low, high = float(clock._second), clock._second + 0.9999994
                else:
                    low = high = 0.0
            pair = row[R_OLD] << 8 | row[R_NEW]
            hit = pairs.get(pair)
            if hit is None:
                hit = pair_of(pair)
            event, in_process, listen_syn = hit
            # Both endpoint cells, once per connection (its transitions
            # share them), except where the kernel gave no peer.
            key = row[R_SADDR:R_FAMILY + 1]
            ends = conn.get(key)
            if ends is None or (listen_syn and key[3] == 0):
                family = key[4]
                local = endpoint(family, key[0], key[2])
                if listen_syn and key[3] == 0:
                    ends = safe(f"{local} {no_peer}")
                else:
                    ends = safe(f"{local} {endpoint(family, key[1], key[3])}")
                    _bounded(conn)[key] = ends
            d = row[R_DURATION]
            if d:
                s = d / 1e9 if d < _DURATION_EXACT else round(d / 1e9, 9)
                age = format_age(int(min(s, 1e12) * 1e9))
            else:
                age = "?"
            owner = task(row[R_PID], row[R_COMM]) if in_process else "-"
            append(f"{padded_cell} {event} {ends} {age:>8} {owner}")
        # textsafe.safe_line of every line: it escapes character by
        # character (safe_line(a + b) == safe_line(a) + safe_line(b)), so
        # each cell is made safe once, when it is made (the clock cell, the
        # date line, EVENT, both endpoints, OWNER); the rest (the age, "?",
        # "-", spaces) is printable ASCII.
        out.append("")
        return "\n".join(out)
