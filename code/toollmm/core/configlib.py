"""A small typed-config engine: dataclasses + YAML layers + dotted overrides, with provenance.

* ``opt(default, "help")`` declares a field with its documentation (shown by ``--print-config``).
* Layers are merged as raw trees (later wins, dicts merge by key, lists replace), each leaf remembering
  which file or override set it; then the tree is turned into the dataclasses in one pass that
  collects EVERY problem (unknown key, wrong type, bad choice, failed cross-field check) before raising.
* A string value may refer to another value as ``${dotted.key}`` (e.g. ``${run.output_root}/${run.name}/cache``);
  references are substituted after building, from the final values (defaults included), so a later layer
  or override of the referenced key moves every value that refers to it. Unknown keys and cycles are
  problems like any other.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from toollmm.core.errors import NotUtf8, UserError, read_text

MISSING = dataclasses.MISSING


class ConfigError(UserError, ValueError):
    """Raised with every problem found, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def opt(default: Any = MISSING, help: str = "", *, factory: Any = None) -> Any:  # noqa: A002
    """A dataclass field with documentation. Mutable defaults go through ``factory``."""
    md = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(default_factory=lambda: _deepcopy(value), metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _deepcopy(x: Any) -> Any:
    import copy

    return copy.deepcopy(x)


# --------------------------------------------------------------------------------------- layering
def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        tree = yaml.safe_load(read_text(path))
    except NotUtf8 as e:
        raise ConfigError([str(e)]) from None
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError([f"{path}: top level must be a mapping, got {type(tree).__name__}"])
    return tree


def merge_tree(base: dict, layer: dict, sources: dict[str, str], source: str, prefix: str = "") -> dict:
    """Deep-merge ``layer`` into ``base`` in place, recording ``source`` for every leaf it sets."""
    for key, value in layer.items():
        key = str(key)
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_tree(base[key], value, sources, source, dotted + ".")
        else:
            base[key] = _deepcopy(value)
            for k in list(sources):  # what this layer replaces (the key itself, or its leaves) is its now
                if k == dotted or k.startswith((dotted + ".", dotted + "[")):
                    del sources[k]
            _record(value, dotted, sources, source)
    return base


def _record(value: Any, dotted: str, sources: dict[str, str], source: str) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _record(v, f"{dotted}.{k}", sources, source)
    else:
        sources[dotted] = source


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}; the value is read as YAML (``true``, ``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError([f"override {text!r}: expected key=value"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r}: empty key part"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    tree: dict = {}
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


# ---------------------------------------------------------------------------------- typed building
def build(cls: type, tree: dict, sources: dict[str, str] | None = None) -> Any:
    """Turn a raw tree into ``cls``; raise ConfigError listing every problem."""
    problems: list[str] = []
    obj = _build_dc(cls, tree, "", sources or {}, problems)
    if not problems:
        interpolate(obj, sources or {}, problems)
    if not problems:
        _check(obj, "", problems)
    if problems:
        raise ConfigError(problems)
    return obj


REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


def _lookup(root: Any, dotted: str) -> Any:
    node = root
    for part in dotted.split("."):
        if dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        elif isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(dotted)
    return node


def interpolate(root: Any, sources: dict[str, str], problems: list[str]) -> None:
    """Substitute every ``${dotted.key}`` in the string values of ``root`` (in place; see module doc)."""
    done: dict[str, str] = {}

    def value_of(key: str, stack: tuple[str, ...], dotted: str) -> str | None:
        if key in stack:
            problems.append(f"{dotted}: ${{{key}}} refers to itself ({' -> '.join((*stack, key))})")
            return None
        if key in done:
            return done[key]
        try:
            v = _lookup(root, key)
        except KeyError:
            problems.append(f"{dotted}: ${{{key}}} names no config value{_where(dotted, sources)}")
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            problems.append(f"{dotted}: ${{{key}}} is {v!r}, not a string or number{_where(dotted, sources)}")
            return None
        out = substitute(str(v), (*stack, key), key) if isinstance(v, str) else str(v)
        if out is not None:
            done[key] = out
        return out

    def substitute(text: str, stack: tuple[str, ...], dotted: str) -> str | None:
        ok = True

        def one(m: re.Match) -> str:
            nonlocal ok
            got = value_of(m.group(1), stack, dotted)
            ok = ok and got is not None
            return got if got is not None else m.group(0)

        out = REF.sub(one, text)
        return out if ok else None

    def walk(node: Any, dotted: str, setter) -> None:
        if isinstance(node, str):
            if "${" in node:
                new = substitute(node, (dotted,), dotted)
                if new is not None:
                    setter(new)
        elif dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                walk(
                    getattr(node, f.name),
                    f"{dotted}.{f.name}".lstrip("."),
                    lambda v, n=node, k=f.name: setattr(n, k, v),
                )
        elif isinstance(node, dict):
            for k in list(node):
                walk(node[k], f"{dotted}.{k}", lambda v, n=node, k=k: n.__setitem__(k, v))
        elif isinstance(node, list):
            for i in range(len(node)):
                walk(node[i], f"{dotted}[{i}]", lambda v, n=node, i=i: n.__setitem__(i, v))

    walk(root, "", lambda v: None)


def _where(dotted: str, sources: dict[str, str]) -> str:
    src = sources.get(dotted)
    if src is None:
        for k, v in sources.items():
            if k.startswith(dotted + "."):
                src = v
                break
    return f" (from {src})" if src else ""


def _build_dc(cls: type, tree: Any, prefix: str, sources: dict, problems: list[str]) -> Any:
    if not isinstance(tree, dict):
        problems.append(
            f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {tree!r}{_where(prefix.rstrip('.'), sources)}"
        )
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in tree:
        if key not in fields:
            dotted = f"{prefix}{key}"
            known = ", ".join(sorted(fields))
            problems.append(f"{dotted}: unknown key{_where(dotted, sources)}; known keys here: {known}")
    kwargs = {}
    for name, f in fields.items():
        if name not in tree:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(f"{prefix}{name}: required")
            continue
        kwargs[name] = _convert(hints[name], tree[name], f"{prefix}{name}", sources, problems)
    try:
        return cls(**kwargs)
    except TypeError as e:  # only reachable when problems were already recorded
        if not problems:
            problems.append(f"{prefix or '<root>'}: {e}")
        return None


_BAD = object()


def _convert(tp: Any, value: Any, dotted: str, sources: dict, problems: list[str]) -> Any:
    origin = get_origin(tp)
    where = _where(dotted, sources)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, dotted, sources, problems)
        for a in inner:  # first type that accepts it, silently
            trial: list[str] = []
            out = _convert(a, value, dotted, sources, trial)
            if not trial:
                return out
        problems.append(f"{dotted}: {value!r} is none of {tp}{where}")
        return _BAD
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            problems.append(f"{dotted}: {value!r} is not one of {list(choices)}{where}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dc(tp, value, dotted + ".", sources, problems)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{dotted}: expected a list, got {value!r}{where}")
            return _BAD
        (item_tp,) = get_args(tp) or (Any,)
        return [_convert(item_tp, v, f"{dotted}[{i}]", sources, problems) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(f"{dotted}: expected a mapping, got {value!r}{where}")
            return _BAD
        key_tp, val_tp = get_args(tp) or (Any, Any)
        out = {}
        for k, v in value.items():
            k2 = _convert(key_tp, k, f"{dotted}.{k}", sources, problems) if key_tp is not Any else k
            out[k2] = _convert(val_tp, v, f"{dotted}.{k}", sources, problems)
        return out
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{dotted}: expected true/false, got {value!r}{where}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value)
            problems.append(f"{dotted}: expected an integer, got {value!r}{where}")
        return value
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{dotted}: expected a number, got {value!r}{where}")
            return value
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        problems.append(f"{dotted}: expected a number, got {value!r}{where}")
        return value
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            problems.append(f"{dotted}: expected a string, got {value!r}{where}")
        return value
    return value


def _check(obj: Any, prefix: str, problems: list[str]) -> None:
    """Run each dataclass's optional ``check() -> list[str]`` (cross-field rules), depth first."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check(v, f"{prefix}{f.name}.", problems)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                _check(item, f"{prefix}{f.name}[{i}].", problems)
        elif isinstance(v, dict):
            for k, item in v.items():
                _check(item, f"{prefix}{f.name}.{k}.", problems)
    check = getattr(obj, "check", None)
    if callable(check):
        problems.extend(f"{prefix}{p}" for p in check())


# ------------------------------------------------------------------------------------- rendering
def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def describe(obj: Any, sources: dict[str, str], prefix: str = "", indent: int = 0) -> list[str]:
    """YAML-like lines, each leaf annotated with where its value came from and its help text."""
    lines: list[str] = []
    pad = "  " * indent
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        dotted = f"{prefix}{f.name}"
        help_ = f.metadata.get("help", "")
        if dataclasses.is_dataclass(v):
            lines.append(f"{pad}{f.name}:")
            lines.extend(describe(v, sources, dotted + ".", indent + 1))
            continue
        src = sources.get(dotted)
        if src is None and any(k.startswith(dotted + ".") or k.startswith(dotted + "[") for k in sources):
            src = next(s for k, s in sources.items() if k.startswith(dotted))
        text = yaml.safe_dump(to_dict(v), default_flow_style=True, width=10_000).strip()
        if text.endswith("\n...") or text.endswith("..."):
            text = text.replace("\n...", "").removesuffix("...").strip()
        note = f"  # [{src or 'default'}]" + (f" {help_}" if help_ else "")
        lines.append(f"{pad}{f.name}: {text}{note}")
    return lines


def documented_fields(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted name, help) for every field, for docs and for a test that every field is documented."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append((prefix + f.name, f.metadata.get("help", "")))
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(documented_fields(tp, prefix + f.name + "."))
    return out
