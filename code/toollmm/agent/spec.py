"""What a tool is: ``ToolSpec`` (name, description, JSON-schema arguments, output type, backend),
``ToolResult`` (what one call gave back), and the ``@tool`` decorator that turns a module-level function
into a spec (its JSON schema read from the signature when not given).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonschema import Draft202012Validator

OUTPUT_TYPES = ("text", "image", "video", "audio")
Isolation = Literal["subprocess", "inprocess"]
_PY_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_VALIDATORS: dict[str, Draft202012Validator] = {}


def validator_for(schema: dict) -> Draft202012Validator:
    """A checked validator per distinct schema (declared sets share a handful of schemas)."""
    key = json.dumps(schema, sort_keys=True)
    if key not in _VALIDATORS:
        Draft202012Validator.check_schema(schema)
        _VALIDATORS[key] = Draft202012Validator(schema)
    return _VALIDATORS[key]


@dataclass
class ToolResult:
    name: str
    arguments: Any
    result: str | None
    error: str | None
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.error is None

    def observation(self) -> str:
        """What the model is shown."""
        return self.result if self.error is None else f"error: {self.error}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    output: str = "text"
    source: str = "user"
    react_args: list[str] | None = None  # ReAct "Action Input" -> these arguments, comma separated
    aliases: list[str] = field(default_factory=list)
    backend: Callable | None = field(default=None, repr=False, compare=False)
    isolation: Isolation = "subprocess"
    # a modality whose decoder renders this tool's result file: the backend answers a JSON object naming a
    # workspace file under that key (``{"image": "image_x.png"}``) and, when the loaded model has that
    # decoder, the inference layer writes the file from the call's ``prompt`` (in-process backends only)
    renders: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"tool name must be a non-empty string, got {self.name!r}")
        if self.output not in OUTPUT_TYPES:
            raise ValueError(f"tool {self.name!r}: output must be one of {OUTPUT_TYPES}, got {self.output!r}")
        if self.renders is not None and self.renders not in OUTPUT_TYPES[1:]:
            raise ValueError(
                f"tool {self.name!r}: renders must be one of {OUTPUT_TYPES[1:]}, got {self.renders!r}"
            )
        if self.parameters.get("type") != "object":
            raise ValueError(f"tool {self.name!r}: parameters must be a JSON schema of type 'object'")
        validator_for(self.parameters)
        if self.react_args is None:
            self.react_args = list(self.parameters.get("properties", {}))

    @property
    def path_args(self) -> list[str]:
        props = self.parameters.get("properties", {})
        return [k for k, v in props.items() if isinstance(v, dict) and v.get("format") == "path"]

    def arguments_from_text(self, text: str) -> dict:
        """GPT4Tools/VIoTGPT convention: 'a, b, rest' -> first args split on commas, the last takes the rest."""
        names = self.react_args or []
        if not names:
            return {}
        parts = text.split(",", len(names) - 1) if len(names) > 1 else [text]
        return {k: v.strip().strip('"').strip() for k, v in zip(names, parts)}

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("name", "description", "parameters", "output", "source")}
        return d | {
            "react_args": self.react_args,
            "aliases": self.aliases,
            "has_backend": self.backend is not None,
        }


def schema_from_signature(fn: Callable) -> dict:
    """A JSON schema from a function's annotated parameters (``Path`` -> a workspace path)."""
    props, required = {}, []
    for p in inspect.signature(fn).parameters.values():
        ann = p.annotation
        if isinstance(ann, str):  # postponed annotations: resolve the simple names we support
            ann = {"str": str, "int": int, "float": float, "bool": bool, "Path": Path}.get(ann, str)
        if ann is Path:
            props[p.name] = {"type": "string", "format": "path"}
        else:
            props[p.name] = {"type": _PY_TYPES.get(ann, "string")}
        if p.default is inspect.Parameter.empty:
            required.append(p.name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def tool(
    name: str | None = None,
    description: str | None = None,
    parameters: dict | None = None,
    output: str = "text",
    *,
    react_args: list[str] | None = None,
    aliases: tuple[str, ...] = (),
    isolation: Isolation = "subprocess",
    source: str = "user",
    renders: str | None = None,
):
    """Mark a module-level function as a tool (the function is returned unchanged)."""

    def deco(fn: Callable) -> Callable:
        fn.__toollmm_tool__ = ToolSpec(
            name=name or fn.__name__,
            description=description if description is not None else (inspect.getdoc(fn) or ""),
            parameters=parameters or schema_from_signature(fn),
            output=output,
            react_args=react_args,
            aliases=list(aliases),
            isolation=isolation,
            source=source,
            renders=renders,
        )
        return fn

    return deco
