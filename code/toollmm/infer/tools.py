"""The model's own abilities bound as tool backends (``toollmm.agent.builtin.bind_model_hooks``).

* ``generate_image`` / ``generate_video`` / ``generate_audio`` (and GPT4Tools' "Generate Image From User
  Input Text"): the prompt is encoded by the decoder pipeline's own text encoder and decoded into a file
  in the workspace; the tool returns its workspace-relative path.
* ``caption`` / ``answer_question`` (and GPT4Tools' "Get Photo Description" / "Answer Question About The
  Image"): the file is fed to the model itself (encoder -> input projection -> LLM) with the question,
  and the tool returns what the model writes (a tool-less engine: no nested tool calls).
* The demo set's ``generate_image`` keeps its reference result (``{"image": "image_<hash>.png"}``, what
  the demo model was trained to read) and, when an image decoder is configured, really writes that file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..agent.builtin import bind_model_hooks
from ..agent.toolsets import run_demo_call

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
    spec = registry.get("generate_image")
    if spec is not None and spec.source == "demo" and decoder is not None and "image" in generate:

        def demo_image(prompt: str) -> str:
            result = run_demo_call("generate_image", prompt=prompt)
            path = Path(folder) / json.loads(result)["image"]
            decoder.from_prompt("image", prompt, "tool:generate_image", path=path)
            return result

        registry.set_backend("generate_image", demo_image, isolation="inprocess")
        bound.append("generate_image")
    log.debug("model-side tools bound: %s", bound)
    return bound
