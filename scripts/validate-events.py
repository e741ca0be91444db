#!/usr/bin/env python3
"""Validates published events against the schemas of `outbox-relay catalog schema`.

    scripts/validate-events.py [--require-all] [--min N] SCHEMA_DIR FILE_OR_DIR...

Each input line is one event as read from Kafka: a JSON object with
`value` (the envelope) and `headers` (name -> value). The envelope's
`dataschema` (and the `ce_dataschema` header, which must agree) names the
data schema, `urn:outbox-relay:schema:<type>:<version>`; the envelope is
validated against SCHEMA_DIR/<type>/<version>/envelope.schema.json and its
`data` against data.schema.json, with the `jsonschema` package's draft
2020-12 validator (independent of the relay's own checks).

Events of a type that has no directory in SCHEMA_DIR (test-only module
catalogs) are counted and skipped, unless --require-all. Exit status 1 when
any event fails, or when fewer than --min events were validated.
"""

import argparse
import json
import os
import sys

import jsonschema

PREFIX = "urn:outbox-relay:schema:"


def inputs(paths):
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                if name.endswith(".jsonl"):
                    yield os.path.join(path, name)
        else:
            yield path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--require-all", action="store_true")
    ap.add_argument("--min", type=int, default=1)
    ap.add_argument("schema_dir")
    ap.add_argument("events", nargs="+")
    args = ap.parse_args()

    validators = {}

    def validator(path):
        if path not in validators:
            with open(path, encoding="utf-8") as f:
                schema = json.load(f)
            cls = jsonschema.Draft202012Validator
            cls.check_schema(schema)
            validators[path] = cls(schema, format_checker=cls.FORMAT_CHECKER)
        return validators[path]

    valid = skipped = 0
    failures = []
    by_type = {}
    for path in inputs(args.events):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                rec = json.loads(line)
                value, headers = rec.get("value"), rec.get("headers", {})
                if not isinstance(value, dict):
                    failures.append(f"{where}: the value is not a JSON object")
                    continue
                uri = value.get("dataschema")
                if headers.get("ce_dataschema") != uri:
                    failures.append(
                        f"{where}: header ce_dataschema {headers.get('ce_dataschema')!r} "
                        f"differs from the envelope's dataschema {uri!r}")
                    continue
                if not isinstance(uri, str) or not uri.startswith(PREFIX) or uri.count(":") != 4:
                    failures.append(f"{where}: dataschema {uri!r} is not {PREFIX}<type>:<version>")
                    continue
                event_type, version = uri[len(PREFIX):].split(":")
                type_dir = os.path.join(args.schema_dir, event_type)
                if not os.path.isdir(type_dir) and not args.require_all:
                    skipped += 1
                    continue
                vdir = os.path.join(type_dir, version)
                if not os.path.isdir(vdir):
                    failures.append(f"{where}: no schema for {event_type} {version} in {args.schema_dir}")
                    continue
                errors = []
                for file, instance in (("envelope.schema.json", value),
                                       ("data.schema.json", value.get("data"))):
                    for e in validator(os.path.join(vdir, file)).iter_errors(instance):
                        at = "/".join(str(p) for p in e.absolute_path)
                        errors.append(f"{file} at /{at}: {e.message}")
                if errors:
                    failures.append(f"{where}: event {value.get('id')} ({event_type} {version}): "
                                    + "; ".join(errors))
                else:
                    valid += 1
                    by_type[event_type] = by_type.get(event_type, 0) + 1

    for f in failures[:50]:
        print(f"INVALID {f}")
    if len(failures) > 50:
        print(f"... and {len(failures) - 50} more")
    types = ", ".join(f"{t} {c}" for t, c in sorted(by_type.items()))
    print(f"{valid} events valid against their schemas ({types}); {len(failures)} invalid; "
          f"{skipped} of types without schemas in {args.schema_dir} skipped "
          f"(jsonschema {jsonschema_version()})")
    if failures:
        return 1
    if valid < args.min:
        print(f"expected at least {args.min} events to validate, got {valid}")
        return 1
    return 0


def jsonschema_version():
    try:
        from importlib.metadata import version
        return version("jsonschema")
    except Exception:  # noqa: BLE001 - only for the report line
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
