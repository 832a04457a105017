"""Column headers, report tables and metric labels each come from one
definition that names the record fields they show (issue 21 step 5):
render.COLUMNS, report.table_columns, metrics.SOCKET_LABELS/LABEL_FIELDS.
These tests fail when a header and its field diverge: a field that is not
the schema's (or not in the report's rows), or a cell under a header that
does not change when its field does (it shows another field, or sits under
another header)."""

import copy
import socket

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from closewait_trace.kernel.events import Endpoints
from closewait_trace.output import metrics, render, report, schema
from closewait_trace.output.sinks import TickView
from closewait_trace.sockets.owners import OWNER_FD, Holder, Ownership
from closewait_trace.sockets.tracker import Lingerer
from tests.unit import recordfactory


def schema_fields(spec) -> set:
    return set(spec.__required_keys__) | set(spec.__optional_keys__)


def changed_span(a: str, b: str) -> tuple:
    """[first, last] column where two lines differ (None when they do not)."""
    width = max(len(a), len(b))
    a, b = a.ljust(width), b.ljust(width)
    diff = [i for i in range(width) if a[i] != b[i]]
    return (diff[0], diff[-1]) if diff else None


# ------------------------------------------------------------- text table

def transition(**kw):
    rec = {"type": "transition", "ts": 1001.0, "time": "", "family": "ipv4",
           "laddr": "127.0.0.1", "lport": 80, "raddr": "10.0.0.1", "rport": 40000,
           "oldstate": "ESTABLISHED", "newstate": "CLOSE_WAIT", "prev_state_s": 1.5,
           "task": {"pid": 42, "comm": "srv"}}
    rec.update(kw)
    return rec


BASE = {"linger": recordfactory.linger, "closed": recordfactory.closed,
        "transition": transition}
# A different value for each field a column shows.
NEW_VALUE = {
    "ts": 1001.0 + 3723, "entered_at": 1001.0 - 7384, "update": True, "how": "reset",
    "oldstate": "SYN_SENT", "newstate": "LAST_ACK", "laddr": "10.9.9.9", "lport": 1234,
    "raddr": "10.8.8.8", "rport": 4321, "age_s": 500.0, "duration_s": 1200.0,
    "prev_state_s": 150.0, "owners": [recordfactory.holder(pid=4242, comm="other")],
    "closed_by": {"pid": 4242, "comm": "other"}, "task": {"pid": 4242, "comm": "other"},
}
# A field shown only in one time format.
TIME_FORMAT_OF = {"entered_at": "entered"}


def test_every_column_field_is_a_field_of_its_records_schema():
    for column in render.COLUMNS:
        assert set(column.fields) == set(render.ROW_TYPES), column.label
        for kind, fields in column.fields.items():
            missing = set(fields) - schema_fields(schema.RECORD_TYPES[kind])
            assert not missing, f"{column.label} shows {missing}, not in {kind} records"


@pytest.mark.parametrize("time_format", render.TIME_FORMATS)
@pytest.mark.parametrize("wide", [False, True])
def test_the_header_is_the_columns_in_order(time_format, wide):
    r = render.TextRenderer(wide=wide, time_format=time_format)
    shown = r.header().split()
    assert len(shown) == len(render.COLUMNS)
    for column, word in zip(render.COLUMNS, shown):
        # TIME says which time (TIME, TIME(s), ENTERED); the others as defined.
        assert word == column.label or column is render.TIME_COLUMN, (column.label, word)
    assert shown[0] == r.clock.label


def column_region(r: render.TextRenderer, column: render.Column) -> tuple:
    """[start, end) of a column in the rows, found from the header line:
    a left-aligned column starts at its header, a right-aligned one ends
    with it; the last one runs to the end of the line."""
    header = r.header()
    labels = header.split()
    index = render.COLUMNS.index(column)
    start = 0
    for word in labels[:index]:
        start = header.index(word, start) + len(word)
    start = header.index(labels[index], start)
    width = r.widths()[column.label]
    if width is None:
        return start, 10**6
    if column.right:
        end = start + len(labels[index])
        return end - width, end
    return start, start + width


CASES = [(column, kind, field) for column in render.COLUMNS
         for kind, fields in column.fields.items() for field in fields]


@pytest.mark.parametrize("column,kind,field", CASES,
                         ids=[f"{c.label}-{k}-{f}" for c, k, f in CASES])
def test_the_cell_under_each_header_shows_its_field(column, kind, field):
    def row(rec):
        r = render.TextRenderer(time_format=TIME_FORMAT_OF.get(field, "clock"))
        lines = r.render(rec)
        return r, lines[0]

    base = BASE[kind]()
    changed = dict(base, **{field: NEW_VALUE[field]})
    r, before = row(base)
    _, after = row(changed)
    span = changed_span(before, after)
    assert span is not None, f"{column.label}: changing {kind}.{field} changed nothing"
    start, end = column_region(r, column)
    assert start <= span[0] and span[1] < end, (
        f"changing {kind}.{field} changed columns {span}, not {column.label}'s "
        f"[{start}, {end}):\n{r.header()}\n{before}\n{after}")


# ------------------------------------------------------------- report tables

def report_of(records):
    return report.build(records, by=list(report.GROUPINGS))


@pytest.fixture(scope="module")
def rep():
    recs = [recordfactory.start()]
    for i, cause in enumerate(("stopped", "never_read", "stopped")):
        recs.append(recordfactory.linger(ts=1001.0 + i, rport=40000 + i, cause=cause,
                                         owners=[recordfactory.holder(pid=42 + i)]))
        recs.append(recordfactory.closed(ts=1010.0 + i, rport=40000 + i, duration=9.0 + i))
    recs.append(recordfactory.summary(ts=1020.0))
    return report_of(recs)


# Fields a row may lack (the command line when none was recorded).
OPTIONAL_ROW_FIELDS = {"cmdline"}
REPORT_NEW_VALUE = {
    "count": 999, "estimated": 3, "lower_bound": 2, "total_s": 99_999.0,
    "longest_s": 88_888.0, "longest_source": "lower_bound", "causes": {"zzcause": 1},
    "programs": {"zzprog": 1}, "pid": 4242, "comm": "zzcomm", "cmdline": "zz --x",
    "processes": 7,
}


def test_every_table_column_field_is_in_every_row(rep):
    assert rep["groupings"] == list(report.GROUPINGS)
    for g in report.GROUPINGS:
        assert rep[f"by_{g}"], g
        for row in rep[f"by_{g}"]:
            for label, fields in report.table_columns(g):
                missing = set(fields) - set(row) - OPTIONAL_ROW_FIELDS
                assert not missing, f"by_{g}: {label} shows {missing}, not in its rows"


def table_lines(rep, g):
    lines = report.render_text(rep, top=1)
    name = report.table_columns(g)[0][0]
    at = [i for i, line in enumerate(lines)
          if line.startswith(f"  {name} ") and "SOCKETS" in line]
    assert len(at) == 1, (g, at)
    return lines[at[0]], lines[at[0] + 1]       # the header, the first row


def table_regions(header: str, columns) -> list:
    """[start, end) of each column, from the header: the name column starts
    with its header and is 36 wide; the numbers end with theirs; the last
    runs to the end of the line."""
    regions, pos = [], 0
    for i, (label, _fields) in enumerate(columns):
        start = header.index(label, pos)
        end = start + len(label)
        if i == 0:
            regions.append((start, start + 36))
        elif i == len(columns) - 1:
            regions.append((start, 10**6))
        else:
            regions.append((regions[-1][1], end))
        pos = end
    return regions


TABLE_CASES = [(g, i, field) for g in report.GROUPINGS
               for i, (_label, fields) in enumerate(report.table_columns(g))
               for field in fields]


@pytest.mark.parametrize("g,index,field", TABLE_CASES,
                         ids=[f"{g}-{i}-{f}" for g, i, f in TABLE_CASES])
def test_the_cell_under_each_table_header_shows_its_field(rep, g, index, field):
    columns = report.table_columns(g)
    header, before = table_lines(rep, g)
    assert header.split()[:1] == columns[0][0].split()[:1]
    changed = copy.deepcopy(rep)
    changed[f"by_{g}"][0][field] = REPORT_NEW_VALUE.get(field, "zzname")
    _, after = table_lines(changed, g)
    span = changed_span(before, after)
    assert span is not None, f"by_{g}: changing {field} changed nothing"
    start, end = table_regions(header, columns)[index]
    assert start <= span[0] and span[1] < end, (
        f"by_{g}: changing {field} changed columns {span}, not {columns[index][0]}'s "
        f"[{start}, {end}):\n{header}\n{before}\n{after}")


# ------------------------------------------------------------- metric labels

def test_every_label_field_is_a_field_of_the_schema():
    assert set(metrics.SOCKET_LABELS) - {"side"} | {metrics.CAUSE_LABEL} == \
        set(metrics.LABEL_FIELDS)
    for label, (spec, *fields) in metrics.LABEL_FIELDS.items():
        missing = set(fields) - schema_fields(getattr(schema, spec))
        assert not missing, f"label {label}: {missing} not in schema.{spec}"


def scrape(sink) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(sink.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s.labels)
    return out


def test_the_labels_carry_their_fields():
    ep = Endpoints(socket.AF_INET, "10.0.0.1", 8443, "10.0.0.2", 40000)
    server = Lingerer(endpoints=ep, enter_ns=0, skaddr=1)
    server.ownership = Ownership(kind=OWNER_FD, listener=object(), holders=[
        Holder(pid=7, comm="nginx", fd=3, state="S", ppid=1, uid=0, cmdline="nginx")])
    client = Lingerer(endpoints=Endpoints(socket.AF_INET, "10.0.0.1", 51000, "10.0.0.3", 5432),
                      enter_ns=0, skaddr=2)
    client.ownership = Ownership(kind=OWNER_FD, holders=[
        Holder(pid=8, comm="app", fd=4, state="S", ppid=1, uid=0, cmdline="app")])
    sink = metrics.MetricsSink(port=0)
    rec = recordfactory.linger(cause="never_read")
    sink.emit(rec)
    sink.tick(TickView(wall_ts=1000.0, now_ns=10**11, threshold_ns=10**9, counters={},
                       histogram=[0] * 64, histogram_sum_ns=None,
                       lingering=lambda: [server, client]))
    got = scrape(sink)
    series = got["closewait_lingering_sockets"]
    assert all(list(labels) == list(metrics.SOCKET_LABELS) for labels in series)
    # comm is the holder's comm; port its lport (server) or rport (client).
    _, lport_field, rport_field = metrics.LABEL_FIELDS["port"]
    assert {(s["comm"], s["port"], s["side"]) for s in series} == {
        ("nginx", str(getattr(ep, lport_field)), "server"),
        ("app", str(getattr(client.endpoints, rport_field)), "client")}
    cause_field = metrics.LABEL_FIELDS[metrics.CAUSE_LABEL][1]
    assert got["closewait_lingered_total"] == [{metrics.CAUSE_LABEL: rec["diagnosis"][cause_field]}]
