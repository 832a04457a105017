"""textsafe.cut's shortcuts (plain ASCII in one slice, the rest read only
as far as the cut) give what the whole-text walk gave, for any text: the
snapshot's diagnosis lines must not change for being made faster."""

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
