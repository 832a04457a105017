"""Whose share a uid is counted in: the user a subordinate uid is lent to.

Where many users' work competes (the owner lookup's fd walk, the other
namespaces' turns, the CPython scan's map places, the metrics endpoint's
connections), the tool gives each user a share, by real uid. A user with
subordinate uids (/etc/subuid, set up by root for rootless containers:
typically 65,536 each) can run processes under each of them, and so had
thousands of shares where everyone else had one. Here a subordinate uid
counts as the user root lent it to: one share for alice and her containers.

Only root's files are read: /etc/subuid for the ranges, /etc/passwd for the
uid of a range's user named by name (not NSS: no lookup that could wait on
a directory server). Both are read again when they change (one stat of
each per lookup of the table), and each at most MAX_FILE_BYTES. A larger
/etc/subuid is not read (every uid is then its own share, as before). A
range's user not found in /etc/passwd (a larger one, or a user only a
directory service knows: LDAP, SSSD) is counted under the range's first
uid: its ranges make one share, and its own uid another."""

from __future__ import annotations

import bisect
import os
from typing import NamedTuple, Optional

SUBUID = "/etc/subuid"
PASSWD = "/etc/passwd"
MAX_FILE_BYTES = 1 << 20
MAX_UID = (1 << 32) - 1


class Share(NamedTuple):
    start: int          # first subordinate uid
    end: int            # one past the last
    owner: int          # whose share they count in


class Shares:
    """The ranges of subordinate uids, each with the uid of its user."""

    def __init__(self, ranges: list[Share]):
        self._ranges = sorted(ranges)
        self._starts = [r.start for r in self._ranges]

    def __len__(self) -> int:
        return len(self._ranges)

    def user_of(self, uid):
        """The uid whose share uid is counted in: its range's user, or uid
        itself (None and anything else that is not an int as given)."""
        if type(uid) is not int or not self._ranges:
            return uid
        at = bisect.bisect_right(self._starts, uid) - 1
        # Ranges may overlap (root's typing): one of those that hold it,
        # looking at the 9 that start last at or before it.
        for r in self._ranges[max(0, at - 8):at + 1]:
            if r.start <= uid < r.end:
                return r.owner
        return uid


NO_SHARES = Shares([])


def _number(text: str) -> Optional[int]:
    """A uid or a count as the files write it: 1-10 ASCII digits (not
    "6\u00b2", which isdigit() takes and int() refuses, nor 5,000 digits,
    which int() refuses too); None otherwise."""
    if 0 < len(text) <= 10 and text.isascii() and text.isdigit():
        return int(text)
    return None


def parse(subuid: str, passwd: str) -> Shares:
    """/etc/subuid's lines (`user:first:count`, user a name or a uid) with
    the uids /etc/passwd gives the names; malformed lines are skipped."""
    uids: dict[str, int] = {}
    for line in passwd.splitlines():
        fields = line.split(":")
        uid = _number(fields[2]) if len(fields) >= 3 else None
        if uid is not None and fields[0] not in uids:
            uids[fields[0]] = uid
    ranges = []
    for line in subuid.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3:
            continue
        user, start, count = fields[0], _number(fields[1]), _number(fields[2])
        if not user or start is None or not count or start > MAX_UID:
            continue
        owner = _number(user) if user.isdigit() else uids.get(user)
        ranges.append((user, start, min(start + count, MAX_UID + 1), owner))
    # A user unknown to /etc/passwd: all of its ranges under its first uid.
    first: dict[str, int] = {}
    for user, start, _end, owner in ranges:
        if owner is None:
            first[user] = min(first.get(user, start), start)
    return Shares([Share(start, end, first[user] if owner is None else owner)
                   for user, start, end, owner in ranges])


def _read(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_FILE_BYTES:
        return None
    return data.decode("utf-8", "replace")


_kept: tuple = (None, NO_SHARES)      # (the files' stat keys, their Shares)


def shares(subuid: Optional[str] = None, passwd: Optional[str] = None) -> Shares:
    """The current table (of SUBUID and PASSWD unless given): read again
    when either file changed since the last call (NO_SHARES without a
    readable /etc/subuid)."""
    global _kept
    subuid = SUBUID if subuid is None else subuid
    passwd = PASSWD if passwd is None else passwd
    keys = []
    for path in (subuid, passwd):
        try:
            st = os.stat(path)
            keys.append((path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            keys.append((path, None))
    key = tuple(keys)
    if _kept[0] == key:
        return _kept[1]
    subuid_text = _read(subuid)
    try:
        table = NO_SHARES if subuid_text is None else parse(subuid_text, _read(passwd) or "")
    except Exception:       # noqa: BLE001 - a table never stops a caller
        # (No line is known to get here: parse skips what it cannot read.)
        table = NO_SHARES
    _kept = (key, table)
    return table
