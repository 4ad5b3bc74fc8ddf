"""``toollmm.load(path)``: a stage / release folder (or Hub id) ready to chat, call tools and make media.

One generation path for everything (held-out evaluation, ``code/inference.py``, the app, benchmarks):
the prompt is rendered by the training renderer (``render_for_generation``), media are preprocessed and
encoded by the frozen encoder, and the decode engine (``toollmm.agent.engine``) drives the model through
``ToolLMMStepModel``: tool calls are parsed, validated and run; complete signal spans are projected and
decoded into files by the diffusion decoders (``toollmm.infer.media``; pipelines built once, lazily).

    rt = toollmm.load("outputs/demo/stage_3", output_dir="out")
    rt.chat("Draw a red circle.")            # -> {"text", "tool_calls", "media", "errors", "timings"}
    rt.chat("<image> What colour is it?", images=["out/image_0.png"])   # history kept
    rt.run([Request(...), ...])              # one output dict per request (``--batch``)

Defaults come from ``config/inference.yaml`` layered on the checkpoint's saved config, then overrides.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from toollmm.core.batch import MediaInputs
from toollmm.core.paths import CONFIG_DIR, OUTPUTS_DIR, resolve
from toollmm.core.tokens import MODALITIES

from ..checkpoint.stage import LoadedStage, load_stage
from .output import TextStream, error_output, output_dict, row_media
from .requests import MEDIA_KEYS, Request
from .session import ChatSession

log = logging.getLogger(__name__)
INFERENCE_YAML = CONFIG_DIR / "inference.yaml"


def default_output_dir() -> Path:
    """``outputs/inference/<timestamp>/`` under the repo root."""
    return OUTPUTS_DIR / "inference" / time.strftime("%Y%m%d-%H%M%S")


class Runtime:
    """A loaded model with its renderer, tool registry, decoders and decode engine."""

    def __init__(
        self,
        stage: LoadedStage,
        *,
        registry=None,
        signal_hook=None,
        workspace=None,
        output_dir=None,
        step_model=None,
        load_s: float = 0.0,
    ):
        from ..agent.toolsets import registry_from_config
        from ..data.render import Renderer
        from ..model.decoders import DecoderPool
        from .media import MediaSink, SignalDecoder
        from .step import ToolLMMStepModel
        from .tools import bind_runtime_tools

        self.stage, self.model, self.cfg = stage, stage.model, stage.config
        self.tokenizer = stage.tokenizer
        self.load_s = load_s
        inf = self.cfg.inference
        # created by the first file written into it (media, tool outputs): a text-only request leaves no
        # empty outputs/inference/<time>/ behind
        self.output_dir = Path(resolve(output_dir)) if output_dir else default_output_dir()
        self.renderer = Renderer.from_config(self.cfg, self.tokenizer)
        self.sink = MediaSink(self.output_dir, inf.seed)
        self.decoders = DecoderPool(self.cfg.model.decoders)
        self.decoder = (
            SignalDecoder(self.model, self.decoders, self.sink) if self.decoders.enabled() else None
        )
        from ..agent.sandbox import Workspace

        ws = workspace if workspace is not None else (inf.workspace or self.output_dir)
        ws = ws if isinstance(ws, Workspace) else Workspace(ws, create=False)  # made when a tool runs
        self.registry = registry if registry is not None else registry_from_config(inf, ws)
        self._signal_hook = signal_hook if signal_hook is not None else self.decoder
        self.set_step_model(step_model if step_model is not None else ToolLMMStepModel(self.model))
        self.tools_bound = bind_runtime_tools(self)
        self.conversation = ChatSession(self)

    def set_step_model(self, step_model) -> None:
        """Drive ``step_model`` (a ``StepModel``: the composed model, or a wrapper of it) from now on."""
        from ..agent.engine import Engine

        self.step_model = step_model
        self._engine_args = dict(
            tool_format=self.cfg.model.tool_format,
            contract=self.model.bundle.contract,
            # the template's turn-end text (vicuna_v0: "###"); ReAct's "Observation:" runs the action instead
            stop_strings=self.renderer.fmt.template.stop_strings,
        )
        self.engine = Engine(
            step_model,
            self.tokenizer,
            self.registry,
            self.cfg.inference,
            signal_hook=self._signal_hook,
            **self._engine_args,
        )
        self._plain_engine = None  # tool-less, no media: the model answering about a file (lazy)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def react(self) -> bool:
        return self.cfg.model.tool_format == "react"

    # ------------------------------------------------------------------------------ preparing requests
    def media_inputs(self, req: Request) -> dict[str, MediaInputs]:
        """Preprocess every medium of ``req`` (the model encodes them; its encoder is frozen)."""
        from toollmm.data.preprocess import load_media

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

    # ------------------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        requests: list[Request],
        *,
        on_tokens: Callable[[int, list[int]], None] | None = None,
        stop_at_tool_call: bool | Sequence[bool] = False,
    ):
        """Continue each conversation; returns the engine's ``RowResult`` per request."""
        prompts = [self.prompt(r) for r in requests]
        media = [self.media_inputs(r) for r in requests]
        return self.engine.generate(prompts, media, on_tokens=on_tokens, stop_at_tool_call=stop_at_tool_call)

    @torch.no_grad()
    def run_rows(
        self,
        requests: list[Request],
        *,
        on_text: Callable[[int, str], None] | None = None,
        stop_at_tool_call: bool | Sequence[bool] = False,
    ) -> tuple[list[dict], list]:
        """Output dicts (the ``--json`` form) and engine rows per request. A request that cannot run
        (unreadable media, unrenderable messages) gets an output whose ``errors`` says why, and row None;
        the others still run. ``on_text(request_index, delta)`` streams the visible text."""
        t0 = time.perf_counter()
        stops = (
            [stop_at_tool_call] * len(requests) if isinstance(stop_at_tool_call, bool) else stop_at_tool_call
        )
        outs: list[dict | None] = [None] * len(requests)
        rows: list = [None] * len(requests)
        ready: list[tuple[int, list[int], dict]] = []
        for i, req in enumerate(requests):
            try:
                ready.append((i, self.prompt(req), self.media_inputs(req)))
            except (ValueError, OSError) as e:
                log.warning("request %s not run: %s", req.id or i, e)
                outs[i] = error_output(f"request {req.id or i}: {e}", self.load_s)
        if ready:
            prep_s = time.perf_counter() - t0
            n0 = len(self.sink)
            stream = None
            if on_text is not None:
                stream = TextStream(
                    self.tokenizer,
                    self.engine.visible_ids,
                    lambda k, d: on_text(ready[k][0], d),
                    stop_strings=self.engine.stop_strings,
                )
            results = self.engine.generate(
                [p for _, p, _ in ready],
                [m for _, _, m in ready],
                on_tokens=stream,
                stop_at_tool_call=[bool(stops[i]) for i, _, _ in ready],
            )
            produced = self.sink.since(n0)
            for (i, _, _), row in zip(ready, results):
                for w in row.warnings:
                    log.warning("request %s: %s", requests[i].id or i, w)
                rows[i] = row
                outs[i] = output_dict(row, row_media(row, produced), self.load_s, prep_s)
        return outs, rows

    def run(self, requests: list[Request], **kwargs) -> list[dict]:
        """One output dict per request (see ``run_rows``)."""
        return self.run_rows(requests, **kwargs)[0]

    # ------------------------------------------------------------------------------ chat
    def chat(
        self,
        text: str = "",
        *,
        images: Sequence[str] = (),
        videos: Sequence[str] = (),
        audios: Sequence[str] = (),
        on_text: Callable[[int, str], None] | None = None,
    ) -> dict:
        """One turn of the runtime's conversation (history kept; ``new_chat()`` starts over). Media are
        placed in front of the text, images then videos then audios, unless the text has placeholders."""
        media = (
            [("image", p) for p in images] + [("video", p) for p in videos] + [("audio", p) for p in audios]
        )
        return self.conversation.send(text, [(m, str(p)) for m, p in media], on_text=on_text)

    def new_chat(self) -> ChatSession:
        self.conversation.reset()
        return self.conversation

    def session(self) -> ChatSession:
        """A separate conversation (e.g. one per app user)."""
        return ChatSession(self)

    # ------------------------------------------------------------------------------ model-side tools
    @torch.no_grad()
    def ask_about(self, path: str | Path, question: str | None = None) -> str:
        """What the model itself says about a media file (caption, or answer to ``question``)."""
        from ..agent.engine import Engine
        from ..agent.registry import Registry
        from .media import modality_of
        from .requests import prompt_request
        from .tools import CAPTION_PROMPTS

        modality = modality_of(path)
        req = prompt_request(question or CAPTION_PROMPTS[modality], [(modality, str(path))])
        if self._plain_engine is None:
            self._plain_engine = Engine(
                self.step_model, self.tokenizer, Registry(), self.cfg.inference, **self._engine_args
            )
        [row] = self._plain_engine.generate([self.prompt(req)], [self.media_inputs(req)])
        return row.text.strip()

    # ------------------------------------------------------------------------------ benchmarks
    def eval_generator(self, benchmark: str, media_root: str | Path | None = None):
        """``generate(prompts) -> outputs`` for ``toollmm.eval.run`` (``evaluate.py run``): prompt records
        in, ``--batch`` outputs back, each row stopping at its first tool call (not run) when the prompt
        sets ``stop_at_tool_call``. Relative media paths are taken from ``media_root`` (default: the
        current directory; ``evaluate.py run`` passes absolute paths). A request that cannot run at all
        (media not found, unrenderable prompt) comes back with ``not_run``: the reason."""
        root = Path(media_root) if media_root else Path.cwd()
        log.info(
            "%s: generating with %s (tool_format %s)", benchmark, self.stage.path, self.cfg.model.tool_format
        )

        def generate(prompts: list[dict]) -> list[dict]:
            reqs = [Request.from_record(p, root) for p in prompts]
            stops = [bool(p.get("stop_at_tool_call")) for p in prompts]
            outs, rows = self.run_rows(reqs, stop_at_tool_call=stops)
            return [
                {**o, "not_run": "; ".join(o["errors"]) or "not run"} if row is None else o
                for o, row in zip(outs, rows)
            ]

        return generate


def load(
    path,
    *,
    overrides: Sequence[str] = (),
    config_files: Sequence[str | Path] | None = None,
    device=None,
    registry=None,
    signal_hook=None,
    workspace=None,
    output_dir=None,
    step_model=None,
) -> Runtime:
    """Load a stage folder, a released folder or a Hub id (the same loader as training's init_from).

    ``config_files`` (default ``config/inference.yaml``) and ``overrides`` are layered on the saved config;
    media go to ``output_dir`` (default ``outputs/inference/<timestamp>/``), which is also the tools'
    workspace unless ``workspace`` / ``inference.workspace`` says otherwise."""
    t0 = time.perf_counter()
    files = (
        list(config_files)
        if config_files is not None
        else ([INFERENCE_YAML] if INFERENCE_YAML.is_file() else [])
    )
    stage = load_stage(path, overrides=list(overrides), config_files=files, with_encoder=True, device=device)
    rt = Runtime(
        stage,
        registry=registry,
        signal_hook=signal_hook,
        workspace=workspace,
        output_dir=output_dir,
        step_model=step_model,
    )
    rt.load_s = time.perf_counter() - t0
    log.info("loaded %s in %.2f s (outputs: %s)", path, rt.load_s, rt.output_dir)
    return rt
