"""The tool registry: what the model may call, how arguments are checked, and how a call runs.

A tool is a ``ToolSpec``: name, description, JSON-schema ``parameters``, output type (``text`` or an
``image`` / ``video`` / ``audio`` file path), and a backend callable — or none, for tools that are only
DECLARED (GPT4Tools, VIoTGPT and MLLM-Tool sets: data and evaluation need their exact names; calling one
answers with a clear error observation). Parameters whose schema has ``"format": "path"`` are file
arguments: they are resolved inside the workspace and the backend receives the real absolute path.

Users add tools with ``@tool(...)`` on a module-level function (then ``Registry.add(fn)`` or a config
entry ``inference.tool_imports: ["pkg.module:function" | "pkg.module"]``), or ``@registry.tool(...)``.
User tools run in a killable subprocess (``sandbox.run_isolated``); trusted in-process backends (the
model's own captioning / decoders) are set with ``set_backend(name, fn, isolation="inprocess")``.

``Registry.call`` never raises: every failure is a ``ToolResult`` with ``error`` set.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

from .sandbox import PathRefused, Workspace, function_ref, run_isolated, to_text, truncate
from .spec import Isolation, ToolResult, ToolSpec, schema_from_signature, tool, validator_for

__all__ = ["Registry", "ToolResult", "ToolSpec", "schema_from_signature", "tool"]

log = logging.getLogger(__name__)


#: deepest argument nesting a call may have (checked without recursion, before anything walks it)
MAX_ARG_DEPTH = 32


def nesting_depth(value: Any, limit: int) -> int:
    """Nesting depth of lists/dicts in ``value``, counted iteratively; stops just past ``limit``."""
    best, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            best = max(best, d)
            if best > limit:
                return best
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return best


class Registry:
    """Named tools plus the limits every call is checked against."""

    def __init__(
        self,
        workspace: str | Path | Workspace | None = None,
        *,
        timeout_s: float = 30.0,
        max_output_chars: int = 4000,
        max_arg_chars: int = 8192,
        enabled: list[str] | None = None,
    ):
        self.workspace = (
            workspace if isinstance(workspace, Workspace) or workspace is None else Workspace(workspace)
        )
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.max_arg_chars = max_arg_chars
        self.enabled = set(enabled) if enabled else None
        self._tools: dict[str, ToolSpec] = {}
        self._alias: dict[str, str] = {}
        self._validators: dict[str, Draft202012Validator] = {}

    @classmethod
    def from_config(cls, cfg, workspace: str | Path | Workspace | None = None) -> Registry:
        """From an ``InferenceConfig``: limits, declared sets, user imports, enabled names."""
        from .toolsets import declare_sets

        reg = cls(
            workspace if workspace is not None else cfg.workspace,
            timeout_s=cfg.tool_timeout_s,
            max_output_chars=cfg.tool_max_output_chars,
            max_arg_chars=cfg.tool_max_arg_chars,
            enabled=list(cfg.tools),
        )
        for dotted in cfg.tool_imports:  # first: a declared set's tool of the same name is then skipped
            reg.import_path(dotted)
        declare_sets(reg, cfg.tool_sets)
        unknown = sorted(n for n in (reg.enabled or ()) if reg.get(n) is None)
        if unknown:
            raise ValueError(reg.unknown_names_message(unknown, cfg.tool_sets))
        if reg.enabled is not None:  # aliases (e.g. VIoT-Tool test-file names) enable the real tool
            reg.enabled = {reg.get(n).name for n in reg.enabled}
        return reg

    def unknown_names_message(self, unknown: list[str], tool_sets: list[str]) -> str:
        """``inference.tools`` (``--tools``) named tools that are not registered: say which, the closest
        registered names, and the valid ones."""
        import difflib

        known = sorted(self._tools)
        close = sorted({m for n in unknown for m in difflib.get_close_matches(n, known, n=3, cutoff=0.6)})
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        listed = ", ".join(known)
        return (
            f"inference.tools (--tools) names unknown tools: {', '.join(map(repr, unknown))}{hint}; the "
            f"{len(known)} tools of tool_sets {list(tool_sets)}: {truncate(listed, 2000)}"
        )

    # ------------------------------------------------------------------ registration
    def add(self, obj: Callable | ToolSpec, *, replace: bool = False) -> ToolSpec:
        """Register a ``@tool`` function or a ``ToolSpec`` (with or without backend)."""
        if isinstance(obj, ToolSpec):
            spec = dataclasses.replace(obj)
        else:
            marked = getattr(obj, "__toollmm_tool__", None)
            if marked is None:
                raise TypeError(f"{obj!r} is not marked with @tool and is not a ToolSpec")
            spec = dataclasses.replace(marked, backend=obj)
        if spec.backend is not None and spec.isolation == "subprocess":
            try:
                function_ref(spec.backend)
            except Exception as e:
                raise TypeError(
                    f"tool {spec.name!r}: a subprocess tool must be a module-level function of an importable "
                    f"module ({type(e).__name__}: {e}); use isolation='inprocess' for closures"
                ) from None
        for n in [spec.name, *spec.aliases]:
            owner = self._alias.get(n, n if n in self._tools else None)
            if owner is not None and owner != spec.name and not replace:
                raise ValueError(f"tool name {n!r} is already registered (by {owner!r})")
        if spec.name in self._tools and not replace:
            raise ValueError(f"tool {spec.name!r} is already registered (pass replace=True)")
        self._tools[spec.name] = spec
        self._validators[spec.name] = validator_for(spec.parameters)
        for a in spec.aliases:
            self._alias[a] = spec.name
        return spec

    def tool(self, *args, **kwargs):
        """``@registry.tool(...)``: mark and register in one go."""

        def deco(fn):
            self.add(tool(*args, **kwargs)(fn))
            return fn

        return deco

    def set_backend(self, name: str, fn: Callable, isolation: Isolation = "inprocess") -> None:
        spec = self.get(name)
        if spec is None:
            raise KeyError(f"no tool named {name!r}")
        self._tools[spec.name] = dataclasses.replace(spec, backend=fn, isolation=isolation)

    def import_path(self, dotted: str) -> list[str]:
        """``pkg.module:function`` registers one @tool function; ``pkg.module`` every @tool in it."""
        mod_name, _, attr = dotted.partition(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ImportError(f"inference.tool_imports: cannot import {mod_name!r} ({e})") from None
        if attr:
            if not hasattr(module, attr):
                raise ImportError(f"inference.tool_imports: {mod_name!r} has no attribute {attr!r}")
            objs = [getattr(module, attr)]
        else:
            objs = [v for v in vars(module).values() if hasattr(v, "__toollmm_tool__")]
            if not objs:
                raise ImportError(f"inference.tool_imports: module {mod_name!r} has no @tool functions")
        return [self.add(o).name for o in objs]

    # ------------------------------------------------------------------ lookup
    def get(self, name: Any) -> ToolSpec | None:
        if not isinstance(name, str):
            return None
        return self._tools.get(self._alias.get(name, name))

    def names(self, source: str | None = None) -> list[str]:
        return [n for n, s in self._tools.items() if source is None or s.source == source]

    def specs(self, names: list[str] | None = None) -> list[ToolSpec]:
        return [self._tools[n] for n in (names if names is not None else self._tools)]

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None

    def __len__(self) -> int:
        return len(self._tools)

    # ------------------------------------------------------------------ calling
    def call_text(self, name: Any, text: Any) -> ToolResult:
        """A ReAct call: ``Action Input`` text mapped onto the tool's arguments, then ``call``."""
        spec = self.get(name)
        if spec is None or not isinstance(text, str):
            return self.call(name, text)
        return self.call(name, spec.arguments_from_text(text), _shown=text)

    def call(self, name: Any, arguments: Any, _shown: Any = None) -> ToolResult:
        """Validate and run one call; never raises."""
        t0 = time.perf_counter()
        shown = arguments if _shown is None else _shown
        if nesting_depth([name, arguments], MAX_ARG_DEPTH) > MAX_ARG_DEPTH:  # before anything walks them
            error = f"arguments nested too deeply (more than {MAX_ARG_DEPTH} levels); nothing was run"
            label = truncate(name, 200) if isinstance(name, str) else "(unnamed)"
            return ToolResult(label, "(too deep to show)", None, error, round(time.perf_counter() - t0, 4))
        spec = self.get(name)
        label = spec.name if spec else truncate(to_text(name), 200)
        try:
            error = self._check(spec, name, arguments)
            result = None
            if error is None:
                result, error = self._run(spec, self._resolve_paths(spec, arguments))
        except PathRefused as e:
            result, error = None, f"argument refused: {e}"
        except Exception as e:  # a bug in a check must still not take the engine down
            log.exception("tool %s failed unexpectedly", label)
            result, error = None, f"internal error: {type(e).__name__}: {e}"
        return ToolResult(label, shown, result, error, round(time.perf_counter() - t0, 4))

    def _check(self, spec: ToolSpec | None, name: Any, arguments: Any) -> str | None:
        if spec is None:
            avail = ", ".join(sorted(self._callable_names()))
            return f"unknown tool {truncate(to_text(name), 200)!r} (available: {truncate(avail, 600)})"
        if self.enabled is not None and spec.name not in self.enabled:
            return f"tool {spec.name!r} is not enabled in this session"
        if not isinstance(arguments, dict):
            return f"arguments must be a JSON object, got {type(arguments).__name__}"
        size = len(to_text(arguments))
        if size > self.max_arg_chars:
            return f"arguments too large ({size} characters > {self.max_arg_chars})"
        errs = sorted(self._validators[spec.name].iter_errors(arguments), key=lambda e: list(e.path))
        if errs:
            msgs = [f"{'/'.join(map(str, e.path)) or '(root)'}: {truncate(e.message, 200)}" for e in errs[:3]]
            return f"invalid arguments for {spec.name!r}: " + "; ".join(msgs)
        if spec.backend is None:
            return (
                f"tool {spec.name!r} ({spec.source}) is declared but has no backend in this session; "
                "nothing was run"
            )
        return None

    def _callable_names(self) -> list[str]:
        return [n for n in self._tools if self.enabled is None or n in self.enabled]

    def _resolve_paths(self, spec: ToolSpec, arguments: dict) -> dict:
        kwargs = dict(arguments)
        for k in spec.path_args:
            if k in kwargs:
                if self.workspace is None:
                    raise PathRefused(f"{k}: no workspace is configured, file arguments are refused")
                try:
                    kwargs[k] = str(self.workspace.resolve(kwargs[k]))
                except PathRefused as e:
                    raise PathRefused(f"{k}: {e}") from None
        return kwargs

    def _run(self, spec: ToolSpec, kwargs: dict) -> tuple[str | None, str | None]:
        cwd = self.workspace.ensure() if self.workspace else None
        if spec.isolation == "subprocess":
            result, error = run_isolated(
                spec.backend, kwargs, timeout_s=self.timeout_s, cwd=cwd, max_chars=self.max_output_chars
            )
        else:
            try:
                result, error = truncate(to_text(spec.backend(**kwargs)), self.max_output_chars), None
            except Exception as e:
                result, error = None, truncate(f"{type(e).__name__}: {e}", self.max_output_chars)
        if error is None and spec.output != "text":
            result, error = self._media_result(spec, result)
        return result, error

    def _media_result(self, spec: ToolSpec, result: str | None) -> tuple[str | None, str | None]:
        if not result:
            return None, f"tool {spec.name!r} returned no {spec.output} file"
        if self.workspace is None:
            return result, None
        try:
            rel = self.workspace.relative(result.strip())
        except PathRefused as e:
            return None, f"tool {spec.name!r} wrote its {spec.output} outside the workspace: {e}"
        if not (self.workspace.root / rel).is_file():
            return None, f"tool {spec.name!r} returned {rel!r}, which does not exist"
        return rel, None

    def describe(self) -> str:
        return json.dumps([s.to_dict() for s in self._tools.values()], indent=1)
