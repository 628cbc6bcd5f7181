"""The published JSON Schemas (schemas/*.schema.json) and their examples.

Checks that both schemas are valid JSON Schema 2020-12, that every example
file under schemas/examples/ is judged as its name says (job-*.json valid,
job-invalid-*.json invalid, dead-letter-*.json valid), and that the examples
embedded in the schemas validate. The C validator is held to the same example
files by tests/unit/test_envelope.c, so the schema and jf_envelope_parse agree.

Run: /usr/bin/python3 -m unittest -v test_schemas   (from tests/integration)
"""

import calendar
import copy
import json
import os
import re
import unittest
from pathlib import Path

from jsonschema import Draft202012Validator, FormatChecker

SOURCE_DIR = Path(os.environ.get("JETFLEET_SOURCE_DIR") or Path(__file__).resolve().parents[2])
SCHEMAS = SOURCE_DIR / "schemas"
EXAMPLES = SCHEMAS / "examples"

# RFC 3339 section 5.6 date-time with a mandatory offset, as common/rfc3339.c
# reads it. jsonschema only checks "date-time" when the optional
# rfc3339-validator package is installed; registering this checker makes the
# test's verdict the same on every machine, and as strict as jetfleet's.
_DATE_TIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.[0-9]+)?(?:[Zz]|[+-]([0-9]{2}):([0-9]{2}))"
)


def is_rfc3339_date_time(value):
    if not isinstance(value, str):
        return True  # "format" applies to strings only; "type" judges the rest
    m = _DATE_TIME.fullmatch(value)
    if m is None:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    if not 1 <= month <= 12:
        return False
    days = [31, 29 if calendar.isleap(year) else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    if not 1 <= day <= days[month - 1]:
        return False
    if hour > 23 or minute > 59 or second > 60:
        return False
    if m.group(7) is not None and (int(m.group(7)) > 23 or int(m.group(8)) > 59):
        return False
    return True


def format_checker():
    checker = FormatChecker()
    checker.checks("date-time")(is_rfc3339_date_time)
    return checker


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def validator(name):
    schema = load(SCHEMAS / name)
    return schema, Draft202012Validator(schema, format_checker=format_checker())


def errors(v, instance):
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in v.iter_errors(instance)]


class DateTimeCheckerTest(unittest.TestCase):
    """The checker the other tests rely on must itself be right."""

    def test_accepts(self):
        for s in ["2026-11-22T10:00:00Z", "2026-11-22t10:00:00.123z", "2024-02-29T00:00:00+01:00",
                  "2000-02-29T23:59:60-05:30", "0000-01-01T00:00:00Z"]:
            with self.subTest(s=s):
                self.assertTrue(is_rfc3339_date_time(s))

    def test_rejects(self):
        for s in ["2026-11-22T10:00:00", "2026-11-22 10:00:00Z", "2026-02-30T10:00:00Z",
                  "1900-02-29T00:00:00Z", "2026-13-01T00:00:00Z", "2026-11-22T24:00:00Z",
                  "2026-11-22T10:60:00Z", "2026-11-22T10:00:61Z", "2026-11-22T10:00:00+24:00",
                  "2026-11-22T10:00:00+0100", "2026-11-22T10:00:00.Z", "2026-11-22T10:00:00Z\n",
                  ""]:
            with self.subTest(s=s):
                self.assertFalse(is_rfc3339_date_time(s))


class SchemaTest(unittest.TestCase):
    def test_schemas_are_valid_2020_12(self):
        for name in ["job.schema.json", "dead-letter.schema.json"]:
            with self.subTest(schema=name):
                schema = load(SCHEMAS / name)
                Draft202012Validator.check_schema(schema)
                self.assertEqual(schema["$schema"], "https://json-schema.org/draft/2020-12/schema")
                for key in ["$id", "title", "description", "examples"]:
                    self.assertTrue(schema.get(key), f"{name}: {key} missing or empty")

    def test_job_examples_are_valid(self):
        _, v = validator("job.schema.json")
        files = sorted(p for p in EXAMPLES.glob("job-*.json")
                       if not p.name.startswith("job-invalid-"))
        self.assertGreaterEqual(len(files), 3, f"too few job examples in {EXAMPLES}")
        for path in files:
            with self.subTest(example=path.name):
                self.assertEqual(errors(v, load(path)), [])

    def test_job_invalid_examples_are_rejected(self):
        _, v = validator("job.schema.json")
        files = sorted(EXAMPLES.glob("job-invalid-*.json"))
        self.assertGreaterEqual(len(files), 10, f"too few invalid job examples in {EXAMPLES}")
        for path in files:
            with self.subTest(example=path.name):
                self.assertNotEqual(errors(v, load(path)), [], f"{path.name} validates")

    def test_dead_letter_examples_are_valid(self):
        _, v = validator("dead-letter.schema.json")
        files = sorted(EXAMPLES.glob("dead-letter-*.json"))
        self.assertGreaterEqual(len(files), 4, f"too few dead-letter examples in {EXAMPLES}")
        reasons = set()
        for path in files:
            with self.subTest(example=path.name):
                dl = load(path)
                self.assertEqual(errors(v, dl), [])
                h = dl["headers"]
                reasons.add(h["Jetfleet-Reason"])
                # The two rules the schema states only in prose.
                self.assertEqual(h["Nats-Msg-Id"],
                                 f"dlq-{h['Jetfleet-Stream']}-{h['Jetfleet-Stream-Seq']}")
                self.assertEqual(dl["subject"], "dlq." + h["Jetfleet-Subject"].split(".", 1)[1])
        self.assertEqual(reasons, {"invalid", "permanent", "max_deliveries", "expired"})

    def test_dead_letter_schema_rejects_broken_records(self):
        _, v = validator("dead-letter.schema.json")
        good = load(EXAMPLES / "dead-letter-max-deliveries.json")
        self.assertEqual(errors(v, good), [])
        breaks = {
            "unknown reason": lambda d: d["headers"].update({"Jetfleet-Reason": "timeout"}),
            "deliveries not digits": lambda d: d["headers"].update({"Jetfleet-Deliveries": "5x"}),
            "empty stream seq": lambda d: d["headers"].update({"Jetfleet-Stream-Seq": ""}),
            "msg id without dlq-": lambda d: d["headers"].update({"Nats-Msg-Id": "JOBS-8145"}),
            "msg id without seq": lambda d: d["headers"].update({"Nats-Msg-Id": "dlq-JOBS-"}),
            "failed-at without offset":
                lambda d: d["headers"].update({"Jetfleet-Failed-At": "2026-11-22T10:04:31"}),
            "failed-at Feb 30":
                lambda d: d["headers"].update({"Jetfleet-Failed-At": "2026-02-30T10:04:31Z"}),
            "error of two lines":
                lambda d: d["headers"].update({"Jetfleet-Error": "HTTP 503\nretry later"}),
            "subject under jobs": lambda d: d.update(subject="jobs.llm.normal.enrich"),
            "header not a string": lambda d: d["headers"].update({"Jetfleet-Deliveries": 5}),
            "missing reason": lambda d: d["headers"].pop("Jetfleet-Reason"),
            "missing body": lambda d: d.pop("body"),
            "body not a string": lambda d: d.update(body={"id": "x"}),
        }
        for name, mutate in breaks.items():
            with self.subTest(case=name):
                bad = copy.deepcopy(good)
                mutate(bad)
                self.assertNotEqual(errors(v, bad), [], f"{name}: validates")

    def test_schema_examples_are_valid(self):
        for name in ["job.schema.json", "dead-letter.schema.json"]:
            schema, v = validator(name)
            for i, example in enumerate(schema["examples"]):
                with self.subTest(schema=name, example=i):
                    self.assertEqual(errors(v, example), [])
            # Per-member examples must satisfy that member's own subschema.
            members = dict(schema.get("properties", {}))
            members.update(schema.get("properties", {}).get("headers", {}).get("properties", {}))
            for key, sub in members.items():
                for example in sub.get("examples", []):
                    with self.subTest(schema=name, member=key, example=example):
                        self.assertEqual(errors(v.evolve(schema=sub), example), [])


if __name__ == "__main__":
    unittest.main()
