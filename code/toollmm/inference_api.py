"""``toollmm.load(path)``: a stage / release folder (or Hub id) ready to generate.

One generation path for everything (held-out evaluation, ``code/inference.py``, the app, benchmarks):
the prompt is rendered by the training renderer (``render_for_generation``), media are preprocessed and
encoded by the frozen encoder, and the decode engine (``toollmm.agent.engine``) drives the model through
``ToolLMMStepModel``: tool calls are parsed, validated and run; complete signal spans are projected and
handed to a signal hook (the decoders, when the caller sets one up).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .batch import MediaInputs
from .checkpoint import LoadedStage, load_stage
from .tokens import MODALITIES

log = logging.getLogger(__name__)
MEDIA_KEYS = {"image": "images", "video": "videos", "audio": "audios"}


@dataclass
class Request:
    """One conversation to continue: HF chat messages + media lists (paths, in placeholder order)."""

    messages: list[dict]
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    audios: list = field(default_factory=list)
    tools: list | None = None
    id: str = ""

    @classmethod
    def from_record(cls, record: dict, media_root: str | Path | None = None) -> Request:
        root = Path(media_root) if media_root else None

        def fix(x):
            if isinstance(x, list):
                return [fix(y) for y in x]
            return str(root / x) if root is not None and not Path(x).is_absolute() else x

        return cls(
            messages=record["messages"],
            images=[fix(x) for x in record.get("images") or []],
            videos=[fix(x) for x in record.get("videos") or []],
            audios=[fix(x) for x in record.get("audios") or []],
            tools=record.get("tools"),
            id=str(record.get("id", "")),
        )


class Runtime:
    """A loaded model with its renderer, tool registry and decode engine."""

    def __init__(self, stage: LoadedStage, *, registry=None, signal_hook=None, workspace=None):
        from .agent.engine import Engine
        from .agent.registry import Registry
        from .data.render import Renderer
        from .model.step import ToolLMMStepModel

        self.stage = stage
        self.model = stage.model
        self.cfg = stage.config
        self.tokenizer = stage.tokenizer
        self.renderer = Renderer.from_config(self.cfg, self.tokenizer)
        self.registry = (
            registry if registry is not None else Registry.from_config(self.cfg.inference, workspace)
        )
        self.step_model = ToolLMMStepModel(self.model)
        self.engine = Engine(
            self.step_model,
            self.tokenizer,
            self.registry,
            self.cfg.inference,
            tool_format=self.cfg.model.tool_format,
            contract=self.model.bundle.contract,
            signal_hook=signal_hook,
        )

    @property
    def device(self) -> torch.device:
        return self.step_model.device

    def media_inputs(self, req: Request) -> dict[str, MediaInputs]:
        """Preprocess every medium of ``req`` (the model encodes them; its encoder is frozen)."""
        from .model.preprocess import load_media

        out = {}
        for m in MODALITIES:
            items = getattr(req, MEDIA_KEYS[m])
            if items:
                pixels = torch.stack([load_media(m, x, self.cfg.model.preprocess) for x in items])
                out[m] = MediaInputs(pixels=pixels.to(self.device), keys=[str(x) for x in items])
        return out

    def prompt(self, req: Request) -> list[int]:
        rendered = self.renderer.render_for_generation(
            req.messages,
            tools=req.tools,
            images=req.images,
            videos=req.videos,
            audios=req.audios,
            record_id=req.id or "<prompt>",
        )
        return [int(i) for i in rendered.input_ids]

    @torch.no_grad()
    def generate(self, requests: list[Request]):
        """Continue each conversation; returns the engine's ``RowResult`` per request."""
        t0 = time.perf_counter()
        prompts = [self.prompt(r) for r in requests]
        media = [self.media_inputs(r) for r in requests]
        results = self.engine.generate(prompts, media)
        log.debug("generated %d rows in %.2f s", len(requests), time.perf_counter() - t0)
        return results


def load(
    path, *, overrides: list[str] = (), device=None, registry=None, signal_hook=None, workspace=None
) -> Runtime:
    """Load a stage folder, a released folder or a Hub id (the same loader as training's init_from)."""
    stage = load_stage(path, overrides=list(overrides), with_encoder=True, device=device)
    return Runtime(stage, registry=registry, signal_hook=signal_hook, workspace=workspace)
