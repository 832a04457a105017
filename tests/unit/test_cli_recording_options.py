"""-w/-r/-C/-G/-W/-z as the command line reads them (tcpdump's conventions
where we follow them). Live tracing is replaced by a recorder of arguments."""

import pytest
from click.testing import CliRunner

from closewait_trace import cli


@pytest.fixture
def live(monkeypatch):
    seen = {}

    def fake_run_live(threshold_ns, socket_filter, as_json, tick_ns, max_tracked, verbose,
                      out, recording_options=None, all_transitions=False, *_more, **_kw):
        seen.update(recording=recording_options, quiet=out.quiet)
    monkeypatch.setattr(cli, "run_live", fake_run_live)
    return seen


def invoke(*args):
    return CliRunner().invoke(cli.main_group, list(args))


@pytest.mark.parametrize("text,size", [
    ("1k", 1024),                 # was refused as "must be at least 1k"
    ("500k", 500 * 1024),
    ("10M", 10 * 1024**2),
    ("1G", 1024**3),
    ("10", 10_000_000),           # a bare number: millions of bytes, as tcpdump
    ("0.5", 500_000),
    ("10MB", 10 * 1024**2),
])
def test_rotation_sizes_are_tcpdumps(live, text, size):
    result = invoke("-w", "/tmp/x.jsonl", "-C", text)
    assert result.exit_code == 0, result.output
    assert live["recording"]["max_bytes"] == size


@pytest.mark.parametrize("args,needle", [
    (["-w", "/tmp/x", "-C", "0.9k"], "at least 1k (1024 bytes)"),
    (["-w", "/tmp/x", "-C", "1000b"], "is not a size"),
    (["-w", "/tmp/x", "-C", "ten"], "is not a size"),
    (["-w", "-", "-C", "1M"], "-C rotates files"),
    (["-w", "-", "-G", "60"], "-G rotates files"),
    (["-w", "-", "--json"], "--json would print there too"),
    (["-w", "/tmp/x", "-W", "3"], "give one too"),
    (["-G", "60"], "-G goes with -w FILE"),
])
def test_bad_combinations(live, args, needle):
    result = invoke(*args)
    assert result.exit_code == 2 and needle in result.output, result.output


def test_time_rotation_with_a_file_cap(live):
    result = invoke("-w", "/tmp/x.jsonl", "-G", "10m", "-W", "6")
    assert result.exit_code == 0, result.output
    assert live["recording"]["max_seconds"] == 600 and live["recording"]["max_files"] == 6


def test_compress_names_the_file_dot_gz(live):
    assert invoke("-w", "/tmp/x.jsonl", "-z").exit_code == 0
    assert live["recording"]["path"] == "/tmp/x.jsonl.gz" and live["recording"]["compress"]
    assert invoke("-w", "/tmp/y.jsonl.gz").exit_code == 0
    assert live["recording"]["path"] == "/tmp/y.jsonl.gz" and live["recording"]["compress"]


def test_write_to_stdout_prints_nothing_else(live):
    assert invoke("-w", "-").exit_code == 0
    assert live["recording"]["path"] == "-" and live["quiet"]
    assert not live["recording"]["compress"]
    assert invoke("-w", "-", "-z").exit_code == 0
    assert live["recording"]["path"] == "-" and live["recording"]["compress"]
