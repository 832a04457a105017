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
left out uncounted. A group's key is small whatever a record holds (a
socket held by thousands of forks lists every one; a recording from
elsewhere, lines of 8 MB): a digest (group_key), or for a live socket of
one holder that holder's few fields from /proc; and its line keeps a few
columns of what it shows. The fold's memory is bounded by MAX_GROUPS, not
by the input.

The line counts CHANGE records: in a live trace one a socket (a batch
diagnoses a socket once), in a replay what the recording holds."""

from __future__ import annotations

import hashlib
from typing import Callable

from closewait_trace.output import textsafe

CHANGE_ROWS_SHOWN = 3
MAX_GROUPS = 1024
INDENT = " " * 9                # a diagnosis line's (render.TextRenderer)
# Columns a group's line shows of its OWNER cell (its middle cut, so that
# its " +N" stays), states and cause (each whole in practice: `pid/comm
# +N`, one or two letters, a cause's name).
OWNER_COLUMNS, STATES_COLUMNS, CAUSE_COLUMNS = 40, 12, 40


class ChangeFold:
    """Which CHANGE rows of a run are shown, and the lines for the rest."""

    def __init__(self, shown: int = CHANGE_ROWS_SHOWN, max_groups: int = MAX_GROUPS):
        self.shown = shown
        self.max_groups = max_groups
        # key -> [rows shown, rows folded, (owner, states, cause) its line shows]
        self._groups: dict = {}

    @property
    def open(self) -> bool:
        return bool(self._groups)

    def admit(self, key, describe: Callable[[], tuple]) -> bool:
        """Whether this CHANGE's rows are shown (else it is counted in its
        group's line). key: what makes its group, small (group_key's
        digest, or a socket's one holder's few fields), None when the
        record's fields could not make one (shown whole, as is a key that
        cannot be hashed). describe(): the (owner, states, cause) its
        group's line shows, as its row shows them, escaped; asked once a
        group."""
        if key is None:
            return True
        try:
            group = self._groups.get(key)
        except TypeError:
            return True
        if group is None:
            if len(self._groups) >= self.max_groups:
                return True
            owner, states, cause = describe()
            group = self._groups[key] = [0, 0, (
                textsafe.cut_middle(owner, OWNER_COLUMNS),   # its " +N" kept
                textsafe.cut(states, STATES_COLUMNS), textsafe.cut(cause, CAUSE_COLUMNS))]
        if group[0] < self.shown:
            group[0] += 1
            return True
        group[1] += 1
        return False

    def close(self) -> list[str]:
        """The lines of the run's folded rows, a group each in the order the
        groups began; the next CHANGE starts a new run."""
        lines = [folded_line(more, *shown)
                 for _shown, more, shown in self._groups.values() if more]
        self._groups.clear()
        return lines


def group_key(kind, cause, first, states, pids) -> bytes:
    """A digest of what makes a CHANGE's group: its owner kind, cause,
    first holder's command (its OWNER cell's), the set of its holders'
    states and every holder's pid, each as text or bytes (pids: the raw
    ints packed, or their text). The same holders, states and cause give
    the same key; whatever a record holds, the key is 16 bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (kind, cause, first, *sorted(states)):
        digest.update(str(part).encode("utf-8", "backslashreplace"))
        digest.update(b"\0")
    digest.update(b"\1")               # the pids, after the texts
    if isinstance(pids, bytes):
        digest.update(pids)
    else:
        for pid in pids:
            digest.update(str(pid).encode("utf-8", "backslashreplace"))
            digest.update(b"\0")
    return digest.digest()


def folded_line(more: int, owner: str, states: str, cause: str) -> str:
    """The line for a group's folded rows, under the rows shown: states and
    cause first, the holders last, as a diagnosis line has them (a command
    name, which its user picks, cannot pass for a state or a cause). It
    counts CHANGE records: in a live trace one a socket, in a replay what
    the recording holds."""
    return (f"{INDENT}+{more:,} more alike: " + (f"[{states}] " if states else "")
            + f"{cause}, {owner}")
