"""textsafe's shortcuts give what the long way gave, for any text: cut
(plain ASCII in one slice, other text read only as far as the cut) and
safe_line (ASCII checked by isprintable, not the regex). The snapshot's
lines must not change for being made faster."""

import json

from hypothesis import given, settings, strategies as st

from closewait_trace.output import textsafe


def cut_by_every_piece(text: str, columns: int) -> str:
    """cut as it was: every piece of the text listed, then kept in order."""
    if textsafe.width_of_escaped(text) <= columns:
        return text
    if columns <= 0:
        return ""
    out, used = [], 0
    for piece, w in textsafe.pieces(text):
        if used + w > columns - 1:
            break
        out.append(piece)
        used += w
    return "".join(out) + textsafe.ELLIPSIS


_ANY = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10ffff,
                                      blacklist_categories=()), max_size=120)
_ASCII = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x7f), max_size=120)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_ANY, _ASCII), st.integers(min_value=-1, max_value=130))
def test_cut_is_the_walk_over_every_piece(raw, columns):
    for text in (textsafe.escape(raw), raw.replace("\\", "")):
        assert textsafe.cut(text, columns) == cut_by_every_piece(text, columns)


def test_the_plain_case_and_escapes_at_the_cut():
    line = "[S] blocked in read on fd 0 (pipe:[27790391]) (wchan anon_pipe_read): at x"
    assert textsafe.cut(line, 71) == line[:70] + textsafe.ELLIPSIS
    assert textsafe.cut("ab\\x1bcd", 5) == "ab" + textsafe.ELLIPSIS
    assert textsafe.cut("ab\\x1bcd", 7) == "ab\\x1b" + textsafe.ELLIPSIS
    assert textsafe.cut("\u4e2d\u6587abc", 4) == "\u4e2d" + textsafe.ELLIPSIS


def safe_line_by_search(line: str) -> str:
    """safe_line as it was: one regex search over every line."""
    if textsafe._UNSAFE.search(line) is None:
        return line
    return textsafe._UNSAFE.sub(lambda m: textsafe._escape_char(m.group(0)), line)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_ANY, _ASCII))
def test_safe_line_shortcut_is_the_search(line):
    """In ASCII the characters the last pass escapes are the ones that are
    not printable (C0 controls and DEL): the shortcut answers the same."""
    assert textsafe.safe_line(line) == safe_line_by_search(line)
    ascii_controls = "".join(map(chr, range(0x20))) + "\x7f"
    assert all(textsafe.safe_line(c) != c for c in ascii_controls)


def width_by_every_character(text: str) -> int:
    """width_of_escaped as it was: every character of a non-ASCII text
    weighed in turn (DEL and above through _char_width, the rest 1)."""
    if text.isascii():
        return len(text)
    return sum(textsafe._char_width(ch) if ord(ch) >= 0x7f else 1 for ch in text)


@settings(max_examples=500, deadline=None)
@given(st.one_of(_ANY, _ASCII))
def test_width_weighs_only_the_characters_above_ascii(text):
    """A snapshot's diagnosis line cut with its ellipsis is 80 characters
    of ASCII and one other: only that one is weighed now, with the same
    width for any text (wide, combining, DEL next to non-ASCII)."""
    for t in (text, text + textsafe.ELLIPSIS, "a\x7f\u4e2d\u0301" + text):
        assert textsafe.width_of_escaped(t) == width_by_every_character(t)


_JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(_JSONISH, st.sampled_from([{}, {"check_circular": False}, {"separators": (",", ":")},
                                  {"separators": [",", ":"]}, {"sort_keys": True},
                                  {"cls": json.JSONEncoder}, {"default": repr}]))
def test_json_dumps_with_a_kept_encoder_is_json_dumps(value, options):
    """json_dumps keeps one encoder per set of options: the text is
    json.dumps' (NaN and infinities as null), options given as a list too,
    and options it keeps no encoder for (a cls, a default)."""
    try:
        expected = json.dumps(value, allow_nan=False, **options)
    except ValueError:
        expected = json.dumps(textsafe.finite(value), allow_nan=False, **options)
    assert textsafe.json_dumps(value, **options) == expected
    assert textsafe.json_dumps(value, **options) == expected      # the kept one
