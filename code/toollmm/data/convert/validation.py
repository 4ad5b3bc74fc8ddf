"""The one place converters validate a record (swap point for toollmm.data.schema.validate_record).

Until the schema helper's validator exists, records are checked with ``jsonschema`` against
``data/schema.json``; as soon as ``toollmm.data.schema.validate_record`` is importable it is used instead.
Two speed-ups keep conversion fast without changing the verdict: ``$ref``s are inlined once (the schema
is not recursive), and a record's ``tools`` list, which sources repeat verbatim on every record, is
validated once per distinct list.
"""

from __future__ import annotations

import json
from functools import lru_cache

from toollmm.paths import DATA_DIR


def _inline_refs(node, defs: dict):
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            target = _inline_refs(defs[ref.rsplit("/", 1)[-1]], defs)
            rest = {k: _inline_refs(v, defs) for k, v in node.items() if k != "$ref"}
            return {**rest, "allOf": [target]} if rest else target
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


@lru_cache(maxsize=1)
def _schema_validator():
    from jsonschema import Draft202012Validator

    with open(DATA_DIR / "schema.json", encoding="utf-8") as f:
        schema = json.load(f)
    return Draft202012Validator(_inline_refs(schema, schema.get("$defs", {})))


def _errors(instance: dict, where: str) -> list[str]:
    prefix = f"{where}: " if where else ""
    out = []
    for err in _schema_validator().iter_errors(instance):
        loc = "/".join(str(p) for p in err.absolute_path) or "<record>"
        out.append(f"{prefix}{loc}: {err.message}")
    return out


@lru_cache(maxsize=256)
def _tools_errors(tools_json: str) -> tuple[str, ...]:
    probe = {
        "id": "x",
        "source": "x",
        "messages": [{"role": "user", "content": ""}],
        "tools": json.loads(tools_json),
    }
    return tuple(_errors(probe, ""))


def _jsonschema_problems(record: dict, where: str = "") -> list[str]:
    tools = record.get("tools") if isinstance(record, dict) else None
    if not isinstance(tools, list) or not tools:
        return _errors(record, where)
    prefix = f"{where}: " if where else ""
    tool_problems = [prefix + p for p in _tools_errors(json.dumps(tools, sort_keys=True))]
    return _errors({**record, "tools": []}, where) + tool_problems


@lru_cache(maxsize=1)
def _validator():
    try:
        from toollmm.data.schema import validate_record
    except ImportError:
        return _jsonschema_problems
    return validate_record


def validate(record: dict, where: str = "") -> list[str]:
    """Problems with ``record`` (empty when valid), each prefixed with ``where`` when given."""
    return _validator()(record, where=where)
