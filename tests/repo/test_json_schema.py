"""docs/closewait-trace.schema.json is the records' schema derived from the
TypedDicts of output/schema.py (issue 21 step 5: one definition, the
reference generated), and an independent JSON Schema validator (Debian's
python3-jsonschema) agrees with the reader's own check on real records and
on crafted ones."""

import copy
import json
import os
import pathlib

import pytest

from closewait_trace.output import schema
from tests.unit import recordfactory as rf

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "closewait-trace.schema.json"

jsonschema = pytest.importorskip("jsonschema") if os.environ.get("CI") != "true" else \
    __import__("jsonschema")


def test_the_schema_file_is_generated_from_the_code():
    assert json.loads(SCHEMA_FILE.read_text()) == schema.json_schema(), (
        "regenerate: python -m closewait_trace.output.schema > docs/closewait-trace.schema.json")


def real_records() -> list:
    """Records the tool wrote: the golden snapshot outputs (real records
    of a fake /proc), the v1 recording upgraded, and the factory's."""
    out = []
    for path in sorted((ROOT / "tests" / "unit" / "data").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if path.name.startswith("v1-"):
                rec = schema.upgrade(rec, 1)
            out.append(rec)
    out += [rf.start(), rf.linger(), rf.closed(), rf.snapshot(), rf.summary(), rf.process(),
            dict(rf.header(), format_version=3)]
    return [r for r in out if r.get("type") in schema.RECORD_TYPES]


def crafted(rec: dict) -> list:
    """Ways a hostile file breaks a record: wrong types, missing fields,
    numbers out of range, a process name longer than the kernel allows."""
    out = []
    for key, value in rec.items():
        if key == "type":
            continue
        # (Not 1e13: JSON Schema's "integer" admits a whole number written
        # as a float, which the reader refuses where an int belongs; the
        # only known difference, stricter on the reader's side.)
        for bad in ("x", -1, None, [], {"a": 1}, 10**13, 0.5, True):
            if bad == value and type(bad) is type(value):
                continue
            r = copy.deepcopy(rec)
            r[key] = bad
            out.append(r)
        r = copy.deepcopy(rec)
        del r[key]
        out.append(r)
    if isinstance(rec.get("comm"), str):
        out.append(dict(copy.deepcopy(rec), comm="c" * 16))
    return out


def test_a_json_schema_validator_agrees_with_the_reader():
    validator = jsonschema.Draft202012Validator(schema.json_schema())
    records = real_records()
    assert len(records) > 100
    for rec in records:
        assert schema.problem(rec) is None, schema.problem(rec)
        assert validator.is_valid(rec), next(validator.iter_errors(rec)).message
    disagreements, checked, refused = [], 0, 0
    for rec in records[:40]:
        for bad in crafted(rec):
            checked += 1
            ours = schema.problem(bad) is None
            refused += not ours
            if validator.is_valid(bad) != ours:
                disagreements.append((schema.problem(bad), bad.get("type")))
    assert checked > 1000 and refused > checked // 2
    assert not disagreements, disagreements[:5]
