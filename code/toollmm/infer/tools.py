"""The model's own abilities bound as tool backends (``toollmm.agent.builtin.bind_model_hooks``).

* ``generate_image`` / ``generate_video`` / ``generate_audio`` (and GPT4Tools' "Generate Image From User
  Input Text"): the prompt is encoded by the decoder pipeline's own text encoder and decoded into a file
  in the workspace; the tool returns its workspace-relative path.
* ``caption`` / ``answer_question`` (and GPT4Tools' "Get Photo Description" / "Answer Question About The
  Image"): the file is fed to the model itself (encoder -> input projection -> LLM) with the question,
  and the tool returns what the model writes (a tool-less engine: no nested tool calls).
* A tool that declares ``renders=<modality>`` (``ToolSpec.renders``; e.g. the demo's ``generate_image``)
  keeps its own result (``{"image": "image_<hash>.png"}``, what the demo model was trained to read) and,
  when that modality's decoder is configured, really writes the file it names from the call's prompt.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..agent.builtin import bind_model_hooks

log = logging.getLogger(__name__)

#: the question asked when captioning (the demo corpus's phrasing)
CAPTION_PROMPTS = {
    "image": "Describe the image.",
    "video": "Describe the video.",
    "audio": "Describe the sound.",
}


def bind_runtime_tools(runtime) -> list[str]:
    """Bind every model-side tool the runtime can serve; returns the tool names bound."""
    registry = runtime.registry
    folder = registry.workspace.root if registry.workspace is not None else runtime.output_dir
    decoder = runtime.decoder
    generate = {}
    if decoder is not None:
        for modality in decoder.pool.enabled():

            def make(prompt: str, _m: str = modality) -> str:
                return decoder.from_prompt(_m, prompt, f"tool:generate_{_m}", folder)["path"]

            generate[modality] = make
    bound = bind_model_hooks(
        registry,
        caption=lambda path: runtime.ask_about(path),
        answer=lambda path, question: runtime.ask_about(path, question),
        generate=generate,
    )
    for spec in registry.specs():
        m = spec.renders
        if m is None or m not in generate or spec.backend is None or spec.isolation != "inprocess":
            continue
        registry.set_backend(spec.name, _rendering(spec, decoder, folder), isolation="inprocess")
        bound.append(spec.name)
    log.debug("model-side tools bound: %s", bound)
    return bound


def _rendering(spec, decoder, folder):
    """``spec``'s own backend, then its ``renders`` decoder writes the file the result names (bound again
    by a second runtime on the same registry, it wraps the tool's own backend, not the first binding)."""
    own, modality = getattr(spec.backend, "own_backend", spec.backend), spec.renders

    def run(prompt: str) -> str:
        result = own(prompt=prompt)
        path = Path(folder) / json.loads(result)[modality]
        decoder.from_prompt(modality, prompt, f"tool:{spec.name}", path=path)
        return result

    run.own_backend = own
    return run
