"""What may reach a terminal, and how wide it is (pure).

Process names, command lines, file names and every string read from a
recording are controlled by someone else: a local user sets a process name
with prctl(PR_SET_NAME), a recording may come from another host. Written raw
to root's terminal, an ESC or OSC sequence clears the screen, sets the title
or writes the clipboard (OSC 52), a CR or newline forges whole lines, and a
bidi override reorders what the eye reads. So every text output path shows
such strings through `escape` (or `fit`, which escapes first, then cuts on
whole escapes, so that a cut never leaves an escape half-open).

Shown escaped: C0 controls and DEL (`\\n`, `\\r`, `\\t`, `\\x1b`...), C1
controls (U+0080-U+009F, `\\u009b`), invalid UTF-8 (a byte kept by
surrogateescape as `\\xNN`, a replacement character as `\\ufffd`), format
characters (bidi overrides and isolates U+202A-U+202E and U+2066-U+2069,
zero-width characters, `\\u202e`), line and paragraph separators, and spaces
other than the ASCII space. A backslash is doubled, so that an escape seen in
the output always stands for the character, never for itself; `\\xNN` from
0x80 up always stands for a byte that was not UTF-8, a character being
`\\uNNNN`: two different strings are never shown the same.

JSON needs none of this (json.dumps escapes control characters), but must
never carry bare NaN or Infinity, which are not JSON: `json_dumps` writes
them as null.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any, Iterator

ELLIPSIS = "\u2026"     # every cut shows it

# What width_of_escaped weighs one by one: DEL and everything above ASCII.
_WIDE_CANDIDATE = re.compile("[^\x00-\x7e]")
# Characters that need no look at all: printable ASCII without the backslash.
_PLAIN = re.compile(r"[\x20-\x5b\x5d-\x7e]*")
# What the final safety pass over a whole line escapes (the backslash is not
# in it: fields were escaped already, and a second escape would double it).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u00a0\u00ad\u061c\u180e\u2000-\u200f"
                     "\u2028-\u202f\u205f-\u206f\u3000\ufeff\ufff9-\ufffd\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _needs_escape(ch: str) -> bool:
    if ch in _SHORT:
        return True
    o = ord(ch)
    if o < 0x20 or 0x7f <= o <= 0x9f:
        return True
    if o < 0x7f:
        return False
    if o == 0xfffd:                      # invalid UTF-8, decoded with "replace"
        return True
    cat = unicodedata.category(ch)
    # Cc controls, Cf format (bidi, zero-width), Cs lone surrogates
    # (surrogateescape'd bytes), Zl/Zp line breaks, Zs non-ASCII spaces.
    return cat in ("Cc", "Cf", "Cs", "Zl", "Zp", "Zs")


def _escape_char(ch: str) -> str:
    short = _SHORT.get(ch)
    if short:
        return short
    o = ord(ch)
    if 0xdc80 <= o <= 0xdcff:           # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{o - 0xdc00:02x}"
    if o < 0x80:
        return f"\\x{o:02x}"
    # A character from U+0080 up is never written \xNN: that spelling is
    # kept for a byte that was not UTF-8, so that the byte 0x9b and the
    # character U+009B (bytes c2 9b) never look the same.
    if o <= 0xffff:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def _char_width(ch: str) -> int:
    # The rule wcwidth() applies: East Asian wide and fullwidth characters
    # take two columns, combining marks none. (Escaped characters never get
    # here: an escape is plain ASCII.)
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def _tokens(value: Any) -> list[tuple[str, int]]:
    """The displayed pieces of value, each with its width: one per
    character, an escape being one piece (never cut in the middle)."""
    out = []
    for ch in _text(value):
        if _needs_escape(ch):
            e = _escape_char(ch)
            out.append((e, len(e)))
        elif ord(ch) < 0x7f:
            out.append((ch, 1))
        else:
            out.append((ch, _char_width(ch)))
    return out


def escape(value: Any) -> str:
    """value as it may be shown on a terminal (see the module's docstring)."""
    kind = type(value)
    if kind is int:
        return str(value)
    text = value if kind is str else _text(value)
    # The common case, in C: printable ASCII without a backslash.
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(t for t, _ in _tokens(text))


def width(value: Any) -> int:
    """Terminal columns that escape(value) takes."""
    text = _text(value)
    if _PLAIN.fullmatch(text):
        return len(text)
    return sum(w for _, w in _tokens(text))


_ESCAPE_SIZE = {"x": 4, "u": 6, "U": 10}


def _pieces(text: str) -> Iterator[tuple[str, int]]:
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n:
            size = _ESCAPE_SIZE.get(text[i + 1], 2)
            yield text[i:i + size], min(size, n - i)
            i += size
        else:
            yield ch, 1 if ord(ch) < 0x7f else _char_width(ch)
            i += 1


def pieces(text: str) -> list[tuple[str, int]]:
    """An escaped text in the pieces a cut must keep whole, with their
    widths: an escape (`\\x1b`, `\\u202e`, `\\n`, `\\\\`) or one character."""
    return list(_pieces(text))


def cut(text: str, columns: int) -> str:
    """An escaped text cut to at most `columns` terminal columns; a cut ends
    with an ellipsis and never splits an escape or a wide character."""
    if width_of_escaped(text) <= columns:
        return text
    if columns <= 0:
        return ""
    if text.isascii() and "\\" not in text:
        # One column per character, no escape to keep whole: the common
        # case (a diagnosis line of every socket), in C.
        return text[:columns - 1] + ELLIPSIS
    out, used = [], 0
    for piece, w in _pieces(text):      # as far as the cut, not the whole text
        if used + w > columns - 1:
            break
        out.append(piece)
        used += w
    return "".join(out) + ELLIPSIS


def cut_middle(text: str, columns: int) -> str:
    """Like cut, with the ellipsis in the middle: both ends of an address
    say more than its middle."""
    if width_of_escaped(text) <= columns:
        return text
    if columns <= 1:
        return ELLIPSIS[:max(0, columns)]
    parts = pieces(text)
    room = columns - 1
    head_room = (room + 1) // 2
    head, used = [], 0
    for piece, w in parts:
        if used + w > head_room:
            break
        head.append(piece)
        used += w
    tail = []
    for piece, w in reversed(parts[len(head):]):
        if used + w > room:
            break
        tail.append(piece)
        used += w
    return "".join(head) + ELLIPSIS + "".join(reversed(tail))


def cut_left(text: str, columns: int) -> str:
    """Like cut, keeping the end: a path's end names its file."""
    if width_of_escaped(text) <= columns:
        return text
    if columns <= 1:
        return ELLIPSIS[:max(0, columns)]
    tail, used = [], 0
    for piece, w in reversed(pieces(text)):
        if used + w > columns - 1:
            break
        tail.append(piece)
        used += w
    return ELLIPSIS + "".join(reversed(tail))


def fit(value: Any, columns: int) -> str:
    """escape(value) cut to at most `columns` columns (see cut)."""
    return cut(escape(value), columns)


def fit_middle(value: Any, columns: int) -> str:
    """escape(value) cut in the middle to at most `columns` columns."""
    return cut_middle(escape(value), columns)


def pad(text: str, columns: int, right: bool = False) -> str:
    """An already escaped text padded to `columns` terminal columns."""
    gap = max(0, columns - width_of_escaped(text))
    return " " * gap + text if right else text + " " * gap


def width_of_escaped(text: str) -> int:
    """Columns of a text that is already safe (escaped): no escapes to add."""
    if text.isascii():
        return len(text)
    # Mostly ASCII (a line cut with its ellipsis): weigh only the others,
    # not every character through a generator (81 per snapshot row).
    odd = _WIDE_CANDIDATE.findall(text)
    return len(text) - len(odd) + sum(_char_width(ch) for ch in odd)


# Printable ASCII, space to tilde: what an ASCII line may hold as it is.
_PRINTABLE_ASCII = bytes(range(0x20, 0x7f))
# From this length on, an ASCII line is checked as bytes: str.isprintable
# looks each character up in the Unicode tables (6.1 us for 2,500
# characters, a linger record's JSON line), the bytes' translate deletes
# the printable ones in one pass (2.6 us, the copy to bytes included);
# below about 250 characters isprintable is the cheaper.
_LONG_LINE = 256


def safe_line(line: str) -> str:
    """The last line of defence, applied to every finished text line: a
    control, format or separator character that reached it through a field
    not escaped on its way is escaped here. Costs one regex search, or
    less: in ASCII, what the search looks for is what is not printable."""
    if line.isascii():
        # No C0 control, no DEL: nothing to escape.
        if len(line) < _LONG_LINE:
            if line.isprintable():
                return line
        elif not line.encode("ascii").translate(None, _PRINTABLE_ASCII):
            return line
    elif _UNSAFE.search(line) is None:
        return line
    return _UNSAFE.sub(lambda m: _escape_char(m.group(0)), line)


# ---------------------------------------------------------------- JSON

def finite(value: Any) -> Any:
    """value with every NaN or infinite float replaced by None (null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_dumps(value: Any, **kwargs) -> str:
    """json.dumps that never writes NaN or Infinity (not JSON; jq and most
    parsers reject them): such a number is written as null. The common case
    costs one encode, by an encoder made once per set of options (json.dumps
    makes a new JSONEncoder at every call given any option: ~3 us a record
    of a snapshot's 10,000)."""
    encoder = _encoder(kwargs)
    try:
        if encoder is None:
            return json.dumps(value, allow_nan=False, **kwargs)
        return encoder.encode(value)
    except ValueError:
        return json.dumps(finite(value), allow_nan=False, **kwargs)


def _encoder(options: dict):
    """The encoder kept for these options; None for options it is not kept
    for (a `default` function, a `cls`, a value given as a list)."""
    if not set(options) <= _CACHED_OPTIONS:
        return None
    key = tuple(sorted(options.items()))
    try:
        encoder = _ENCODERS.get(key)
    except TypeError:                   # unhashable: not kept
        return None
    if encoder is None:
        encoder = _ENCODERS[key] = json.JSONEncoder(allow_nan=False, **options)
    return encoder


# Options whose values are plain and few (an encoder kept for each set of
# them); a `default` function or a `cls` makes its own encoder every call.
_CACHED_OPTIONS = {"check_circular", "separators", "ensure_ascii", "sort_keys", "indent"}
_ENCODERS: dict = {}


def encode_function(options: dict):
    """What json_dumps(value, **options) gives for a value with no NaN or
    infinity (those raise ValueError), as one function made once: the C
    encoder's maker called directly, where encoder.encode(value) sets one
    up at every call (about 1 us; a linger line encodes a few values).
    The options must be ones _encoder keeps."""
    encoder = _encoder(options)
    c_make = getattr(json.encoder, "c_make_encoder", None)
    if c_make is None:
        return encoder.encode
    make = c_make(None, encoder.default,
                  json.encoder.encode_basestring_ascii if encoder.ensure_ascii
                  else json.encoder.encode_basestring,
                  None, encoder.key_separator, encoder.item_separator, encoder.sort_keys,
                  encoder.skipkeys, encoder.allow_nan)
    return lambda value, _join="".join: _join(make(value, 0))
