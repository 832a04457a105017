"""CHANGE rows folded in the text output (pure).

When a holder of many sockets changes state (SIGSTOP, a debugger attached,
SIGCONT), every socket it holds gets a new diagnosis, and each was a CHANGE
row and its diagnosis line: 5,000 lines for a holder of 2,500 sockets, and
again when it went on, in the very incident the on-call is reading the
tail of. The text shows the first CHANGE_ROWS_SHOWN of the sockets that
changed alike (the same holders, in the same states, with the same
cause), then one line that counts the rest and says who and what. Every
record is still written: `--json`, the recording (so `report` and
`-r --json`) and the metrics have one per socket; this is the text's view
of them only.

A fold runs over one run of CHANGE records: in a live trace one batch (the
terminal sink's hold_batch), in a replay the CHANGE records read one after
another. Any other record, a flush or the end closes it, and its lines are
written then, before whatever closed it. The run keeps at most MAX_GROUPS
groups: a CHANGE of a group past that is shown whole, so nothing is ever
left out uncounted. A group's key is a digest of what makes it and the
few columns its line shows of that, whatever a record holds (a socket held
by thousands of forks lists every one; a recording from elsewhere, lines
of 8 MB): the fold's memory is bounded by MAX_GROUPS, not by the input."""

from __future__ import annotations

import hashlib
from typing import Optional

from closewait_trace.output import textsafe

CHANGE_ROWS_SHOWN = 3
MAX_GROUPS = 1024
INDENT = " " * 9                # a diagnosis line's (render.TextRenderer)
# Columns a group's line shows of its OWNER cell, states and cause (each
# whole in practice: `pid/comm +N`, one or two letters, a cause's name).
OWNER_COLUMNS, STATES_COLUMNS, CAUSE_COLUMNS = 40, 12, 40


class ChangeFold:
    """Which CHANGE rows of a run are shown, and the lines for the rest."""

    def __init__(self, shown: int = CHANGE_ROWS_SHOWN, max_groups: int = MAX_GROUPS):
        self.shown = shown
        self.max_groups = max_groups
        # change_key's -> [rows shown, rows folded]
        self._groups: dict = {}

    @property
    def open(self) -> bool:
        return bool(self._groups)

    def admit(self, key: Optional[tuple]) -> bool:
        """Whether this CHANGE's rows are shown (else it is counted in its
        group's line). key: change_key's, None when the record's fields
        could not make one (shown whole)."""
        if key is None:
            return True
        group = self._groups.get(key)
        if group is None:
            if len(self._groups) >= self.max_groups:
                return True
            group = self._groups[key] = [0, 0]
        if group[0] < self.shown:
            group[0] += 1
            return True
        group[1] += 1
        return False

    def close(self) -> list[str]:
        """The lines of the run's folded rows, a group each in the order the
        groups began; the next CHANGE starts a new run."""
        lines = [folded_line(more, owner, states, cause)
                 for (_digest, owner, states, cause), (_shown, more) in self._groups.items()
                 if more]
        self._groups.clear()
        return lines


def change_key(pids, owner: str, states: str, cause: str) -> tuple:
    """A CHANGE's group: its holders (every pid, as text), its OWNER cell
    and states as its row shows them, its cause; every value escaped text
    (render.escape), so a socket and its record give the same key. Kept as
    a digest of them all and the columns its line shows of each."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (owner, states, cause, *pids):
        digest.update(part.encode("utf-8", "backslashreplace"))
        digest.update(b"\0")           # no escaped text holds a NUL
    return (digest.digest(), textsafe.cut(owner, OWNER_COLUMNS),
            textsafe.cut(states, STATES_COLUMNS), textsafe.cut(cause, CAUSE_COLUMNS))


def folded_line(more: int, owner: str, states: str, cause: str) -> str:
    """The line for a group's folded rows, under the rows shown: states and
    cause first, the holders last, as a diagnosis line has them (a command
    name, which its user picks, cannot pass for a state or a cause)."""
    what = "socket" if more == 1 else "sockets"
    return (f"{INDENT}+{more:,} more {what} alike: " + (f"[{states}] " if states else "")
            + f"{cause}, {owner}")
