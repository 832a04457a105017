"""The documentation against the tool: the man page documents every option
of every command (and nothing the command lacks), the examples file's and
the README's command lines still parse, the examples file is what
scripts/make-example.sh makes of its template, and every link between the
README and docs/ lands somewhere."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from closewait_trace import cli
from closewait_trace.output import report

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "packaging" / "man" / "man8" / "closewait-trace.8"
EXAMPLE = ROOT / "docs" / "closewait-trace_example.txt"
TEMPLATE = ROOT / "scripts" / "closewait-trace_example.txt.in"
SCRIPT = ROOT / "scripts" / "make-example.sh"
OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z0-9][A-Za-z0-9-]*)")


# --- the man page ----------------------------------------------------------------

def man_text() -> str:
    """The page's source with roff's escapes taken off: \\- is -, fonts gone."""
    text = MAN.read_text()
    text = re.sub(r"\\f[BIRP]", "", text)
    return text.replace("\\-", "-").replace("\\(em", "-")


def man_sections() -> dict[str, str]:
    """The options of each command: the main one's under .SH OPTIONS, a
    subcommand's under .SS NAME (up to the next .SS or .SH)."""
    text = man_text()
    sections = {}
    main = re.search(r"^\.SH OPTIONS\n(.*?)(?=^\.S[SH] )", text, re.M | re.S)
    sections[""] = main.group(1)
    for m in re.finditer(r"^\.SS (\S+)\n(.*?)(?=^\.S[SH] |\Z)", text, re.M | re.S):
        sections[m.group(1)] = m.group(2)
    return sections


def paragraphs(section: str) -> list[tuple[str, str]]:
    """(tag line, body) of each .TP item of a section."""
    items = []
    for chunk in re.split(r"^\.TP\n", section, flags=re.M)[1:]:
        tag, _, body = chunk.partition("\n")
        body = re.split(r"^\.(?:PP|SS|SH)\b", body, flags=re.M)[0]
        items.append((tag, body))
    return items


def commands() -> dict[str, click.Command]:
    return {"": cli.main_group, **cli.main_group.commands}


def options_of(name: str, command: click.Command) -> dict[str, click.Option]:
    """Every option string (short and long) of a command, with its option;
    the help option only for the main command (the page says it works after
    every command)."""
    ctx = click.Context(command, info_name="closewait-trace")
    found = {}
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option):
            continue
        if name and param.name == "help":
            continue
        for opt in param.opts + param.secondary_opts:
            found[opt] = param
    return found


def test_every_command_has_its_section_and_synopsis():
    sections = man_sections()
    synopsis = re.search(r"^\.SH SYNOPSIS\n(.*?)^\.SH ", man_text(), re.M | re.S).group(1)
    for name in commands():
        assert name in sections, f"the man page has no section .SS {name}"
        if name:
            assert re.search(rf"^\.B closewait-trace {name}$", synopsis, re.M), name


@pytest.mark.parametrize("name", list(commands()))
def test_every_option_of_each_command_is_in_its_man_page_section(name):
    """Walks the click command itself (not --help's wrapped text), so an
    option added to any command, or given a new short or long name, fails
    here until its own section of the page documents it."""
    section = man_sections()[name]
    mentioned = set(OPTION.findall(section))
    missing = sorted(set(options_of(name, commands()[name])) - mentioned)
    assert missing == [], f"closewait-trace {name}: not in the man page's section: {missing}"


@pytest.mark.parametrize("name", list(commands()))
def test_every_option_the_man_page_documents_exists(name):
    """The other way: an option renamed or removed in the tool, still
    described in the page (an item's tag), fails."""
    options = options_of(name, commands()[name])
    if not name:
        options.update({"-h": None, "--help": None})
    stale = []
    for tag, _body in paragraphs(man_sections()[name]):
        for opt in OPTION.findall(tag):
            if opt not in options:
                stale.append(opt)
    assert stale == [], f"closewait-trace {name}: the man page documents {stale}, the tool has none"


@pytest.mark.parametrize("name", list(commands()))
def test_man_page_states_each_default_and_choice(name):
    """A default the tool shows in --help, and every value of a choice, is in
    the option's own item of the page."""
    items = paragraphs(man_sections()[name])
    problems = []
    for opt, param in options_of(name, commands()[name]).items():
        if param is None or not opt.startswith("--") and any(
                o.startswith("--") for o in param.opts):
            continue        # each option once, by its long name
        item = [body for tag, body in items if opt in OPTION.findall(tag)]
        if not item:
            continue        # listed together with others ("as for the live tail")
        body = item[0]
        default = param.default
        if param.show_default and not param.is_flag and default is not None:
            if not re.search(rf"(?<![\w.]){re.escape(str(default))}(?!\w|\.\d)", body):
                problems.append(f"{opt}: default {default}")
        if isinstance(param.type, click.Choice):
            problems += [f"{opt}: {c}" for c in param.type.choices if c not in body]
    assert problems == [], f"closewait-trace {name}: not in the man page: {problems}"


def test_every_report_grouping_is_in_the_man_page():
    """report --by is a free list checked by the report, not a click Choice."""
    body = [b for tag, b in paragraphs(man_sections()["report"]) if "--by" in tag][0]
    missing = [g for g in report.GROUPINGS if not re.search(rf"\b{g}\b", body)]
    assert missing == []


# --- command lines in the docs still parse -----------------------------------------

def parse(argv: list[str]) -> None:
    """Parse a command line as the tool would, without running it: an
    unknown option, a removed command or a bad value raises."""
    group = cli.main_group
    if argv and argv[0] in group.commands:
        command = group.commands[argv[0]]
        command.make_context(f"closewait-trace {argv[0]}", argv[1:])
    else:
        group.make_context("closewait-trace", argv)


def example_command_lines() -> list[str]:
    return re.findall(r"^    # closewait-trace ?(.*)$", EXAMPLE.read_text(), re.M)


def test_the_example_file_shows_each_command():
    lines = example_command_lines()
    shown = {shlex.split(line)[0] if line and not line.startswith("-") else ""
             for line in lines}
    assert {"", "snapshot", "top", "report"} <= shown, lines
    assert any(" -r " in f" {line} " for line in lines)


@pytest.mark.parametrize("line", example_command_lines())
def test_example_command_lines_still_parse(line):
    try:
        parse(shlex.split(line))
    except click.ClickException as exc:
        pytest.fail(f"docs/closewait-trace_example.txt: `closewait-trace {line}`: {exc.format_message()}")


def readme_command_lines() -> list[str]:
    """`closewait-trace ...` at the start of an indented command in the
    README (the lines an on-call copies), up to a comment or a pipe."""
    found = []
    for m in re.finditer(r"^    (?:# |\$ )?closewait-trace(?: (.*))?$",
                         (ROOT / "README.md").read_text(), re.M):
        line = re.split(r"\s+(?:#|\||>|\()", m.group(1) or "")[0]
        found.append(line.strip())
    return found


def test_readme_command_lines_still_parse():
    lines = readme_command_lines()
    assert len(lines) >= 8, lines
    bad = []
    for line in lines:
        try:
            parse(shlex.split(line.replace("PORT", "8080")))
        except click.ClickException as exc:
            bad.append(f"closewait-trace {line}: {exc.format_message()}")
    assert bad == []


def test_a_renamed_option_would_fail_the_example_check():
    """The check itself: the same line with an option the tool lacks fails."""
    with pytest.raises(click.ClickException):
        parse(["snapshot", "-v", "--no-such-option"])
    with pytest.raises(click.ClickException):
        parse(["--no-such-option"])


# --- the examples file is the script's output ------------------------------------

def test_example_file_is_the_template_filled_in():
    """Each piece of commentary of the template is in the examples file, in
    order, and every placeholder was filled with a command that the script
    runs: the file is regenerated, not edited by hand."""
    template = TEMPLATE.read_text()
    example = EXAMPLE.read_text()
    names = re.findall(r"^@@(\w+)@@$", template, re.M)
    assert len(names) >= 6
    script = SCRIPT.read_text()
    for name in names:
        assert re.search(rf"^(?:capture|show) {name} ", script, re.M), name
    pos = 0
    for piece in re.split(r"^@@\w+@@$", template, flags=re.M):
        at = example.find(piece.strip("\n"), pos)
        assert at >= 0, f"commentary not in the examples file (run scripts/make-example.sh):\n{piece[:200]}"
        pos = at + len(piece.strip("\n"))
    assert "@@" not in example
    assert len(example_command_lines()) == len(names)


# --- links between the README and docs/ ------------------------------------------

def anchors(text: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def markdown_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_resolves(path):
    text = path.read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            broken.append(target)
    assert broken == [], f"{path.name}: links to nothing: {broken}"


def test_man_page_events_are_the_ones_the_table_prints():
    """OUTPUT's EVENT item names every event the text table prints, and no
    other (it once listed a LOST event the tool never prints)."""
    source = (ROOT / "src" / "closewait_trace" / "output" / "render.py").read_text()
    printed = set()
    for line in re.findall(r"^\s*event = (.*)$", source, re.M):
        printed |= set(re.findall(r'"([A-Z]{4,})"', line))
    assert {"LINGER", "CHANGE", "CLOSED"} <= printed
    output = re.search(r"^\.SH OUTPUT\n(.*?)^\.SH ", man_text(), re.M | re.S).group(1)
    event = [body for tag, body in paragraphs(output) if tag.strip() == ".B EVENT"][0]
    documented = set(re.findall(r"^\.B ([A-Z]{4,})$", event, re.M))
    assert documented == printed


# --- docs/layout.md names the tree as it is ---------------------------------------

def test_layout_names_every_module_and_only_paths_that_exist():
    text = (ROOT / "docs" / "layout.md").read_text()
    package = ROOT / "src" / "closewait_trace"
    missing = []
    for module in sorted(package.rglob("*.py")):
        if module.name == "__init__.py":
            continue
        # by name in its directory's row, or by its path
        if not any(f"`{name}`" in text for name in (
                module.name, module.relative_to(package), module.relative_to(ROOT))):
            missing.append(str(module.relative_to(ROOT)))
    assert missing == [], f"docs/layout.md does not name: {missing}"
    stale = []
    for row in text.splitlines():
        if not row.startswith("| `"):
            continue
        first = row.split("|")[1]
        paths = re.findall(r"`([^`]+)`", first)
        beside = (ROOT / paths[0]).parent      # `dir/a.py`, `b.py`: b.py beside a.py
        for path in paths:
            if not (ROOT / path).exists() and not (beside / path).exists():
                stale.append(path)
    assert stale == [], f"docs/layout.md names paths that do not exist: {stale}"


def test_exit_codes_in_the_man_page_and_options_doc_are_the_tools():
    from closewait_trace import errors
    codes = {0, 1} | {v for k, v in vars(errors).items()
                      if k.startswith("EXIT_") and k != "EXIT_INTERRUPTED"}
    status = re.search(r"^\.SH EXIT STATUS\n(.*?)^\.SH ", man_text(), re.M | re.S).group(1)
    assert {int(c) for c in re.findall(r"^\.TP\n\.B (\d+)$", status, re.M)} == codes
    table = (ROOT / "docs" / "options.md").read_text()
    assert {int(c) for c in re.findall(r"^\| (\d+) \|", table, re.M)} == codes
    # --help says them too, each as the man page does (8 was "other
    # processes could not be read", which the tool never exits for: a
    # newcomer's report).
    from click.testing import CliRunner
    from closewait_trace import cli
    said = " ".join(CliRunner().invoke(cli.main_group, ["--help"]).output.split())
    listed = said.split("Exit codes: ", 1)[1].split(".", 1)[0]
    meaning = {int(c): what for c, what in re.findall(r"(\d+) ([^,]+)", listed)}
    assert set(meaning) == codes
    assert "snapshot" in meaning[errors.EXIT_GATHER] and "nothing printed" in \
        meaning[errors.EXIT_GATHER]
    assert "nothing was printed" in " ".join(status.split(".B 8", 1)[1].split())


def test_readme_reads_in_an_80_column_terminal():
    """An on-call reads the README with less in an 80-column terminal: its
    commands and prose fit (the quick-start block was 86-99 columns wide, a
    newcomer's report). The table of links is markdown, left to wrap."""
    wide = [f"README.md:{n}: {len(line)} columns"
            for n, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1)
            if len(line) > 80 and not line.startswith("|")]
    assert wide == []


# --- the report's bounds as the docs state them are the code's --------------------

def flat(name: str) -> str:
    """A doc's text with its line breaks and runs of spaces as one space."""
    return " ".join((ROOT / "docs" / name).read_text().split())


def test_the_reports_bounds_in_the_docs_are_the_codes():
    """recording.md said `still_lingering` holds "at most the first 10,000
    followed" while report lists the MAX_STILL (1,000) oldest: each
    statement of a report cap in docs/ is checked against its constant."""
    still = re.search(r"`still_lingering` lists (.*?);", flat("recording.md")).group(1)
    assert f"the {report.MAX_STILL:,} oldest" in still, still
    assert f"{report.MAX_LINGERING:,} followed" in still, still
    caps = re.search(r"the report keeps at most (.*?); whatever passes a cap",
                     flat("security.md")).group(1)
    for said in (f"{report.MAX_LINGERING:,} sockets lingering at once",
                 f"{report.MAX_ROWS:,} rows per table",
                 f"{report.MAX_NAMES} causes or programs",
                 f"{report.MAX_PIDS} processes per row",
                 f"{report.MAX_HOLDERS} holder processes per socket",
                 f"{report.MAX_PROCESSES:,} process identities",
                 f"{report.MAX_STILL:,} still-lingering sockets listed",
                 f"{report.MAX_CAPTURES} captures and loss records listed",
                 f"a timeline of {report.TIMELINE_SLOTS:,} slots"):
        assert said in caps, (said, caps)
    assert report.MAX_CAPTURES == report.MAX_LOSS_RECORDS
