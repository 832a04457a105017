"""The snapshot's rows take a shortcut (render.TextRenderer._row: escaped
ASCII cells padded by format in one f-string); any row must come out as
the column-by-column loop made it, ASCII or not, in every clock style."""

from hypothesis import given, settings, strategies as st

from closewait_trace.output import render
from closewait_trace.output.textsafe import escape, pad

_TEXT = st.one_of(st.text(max_size=30), st.text(alphabet="0123456789.:abf", max_size=45))
_PORT = st.one_of(st.integers(min_value=0, max_value=65535), st.text(max_size=8))


def row_by_every_column(r: render.TextRenderer, rec: dict, event: str, age: str,
                        owner: str) -> list[str]:
    """_row as it was: each column's cell padded by textsafe.pad (EVENT by
    characters), the last as long as it is."""
    widths = r.widths()
    cell, before = r.clock.cell(rec.get("ts"))
    local = render.hostport(rec.get("laddr"), rec.get("lport"), None if r.wide else widths["LOCAL"])
    remote = render.hostport(rec.get("raddr"), rec.get("rport"),
                             None if r.wide else widths["REMOTE"])
    cells = {"TIME": cell, "EVENT": event, "LOCAL": local, "REMOTE": remote, "AGE": age,
             "OWNER": owner}
    line = []
    for column in render.COLUMNS:
        text, width = cells[column.label], widths[column.label]
        if width is None:
            line.append(text)
        elif column is render.EVENT_COLUMN:
            line.append(f"{text:<{width}}")
        else:
            line.append(pad(text, width, right=column.right))
    return before + [" ".join(line)]


@settings(max_examples=400, deadline=None)
@given(_TEXT, _PORT, _TEXT, _PORT, st.sampled_from(["~21.5s", ">=3m", "\u226510s", "?", ""]),
       st.text(max_size=20), st.booleans(), st.sampled_from(["clock", "epoch", "iso", "elapsed"]))
def test_row_shortcut_is_the_column_loop(laddr, lport, raddr, rport, age, comm, wide, style):
    rec = {"type": "linger", "ts": 1764858000.25, "laddr": laddr, "lport": lport,
           "raddr": raddr, "rport": rport}
    owner = f"1234/{escape(comm)}"
    fast = render.TextRenderer(wide=wide, time_format=style)
    slow = render.TextRenderer(wide=wide, time_format=style)
    assert fast._row(rec, "LINGER", age, owner) == row_by_every_column(slow, rec, "LINGER", age,
                                                                        owner)
