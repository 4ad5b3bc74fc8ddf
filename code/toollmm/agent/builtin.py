"""Built-in tools: the model's own abilities (declared here, bound by the inference layer) and the CPU
backends this package ships for declared upstream tools.

Model-side tools (``generate_image`` / ``generate_video`` / ``generate_audio`` through the decoders,
``caption`` / ``answer_question`` through the LLM itself) need the loaded model, so they are declared
without a backend; ``bind_model_hooks`` attaches in-process backends once the model exists, and also
binds the GPT4Tools tools that mean the same thing ("Get Photo Description", "Answer Question About The
Image", "Generate Image From User Input Text").

``cpu_tools.edge_detection`` is the real CPU backend attached to GPT4Tools' "Edge Detection On Image".
"""

from __future__ import annotations

from collections.abc import Callable

from .cpu_tools import edge_detection
from .registry import Registry, ToolSpec

_PROMPT = {"type": "string", "minLength": 1, "maxLength": 2000}
_PATH = {"type": "string", "format": "path", "minLength": 1, "maxLength": 1024}


def _obj(**props) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def builtin_specs() -> list[ToolSpec]:
    specs = [
        ToolSpec(
            f"generate_{m}",
            f"Generate {'an' if m == 'image' else 'a'} {m} from a text description with the model's {m} "
            f"decoder; returns the path of the new {m} file.",
            _obj(prompt=_PROMPT),
            output=m,
            source="builtin",
        )
        for m in ("image", "video", "audio")
    ]
    specs.append(
        ToolSpec(
            "caption",
            "Describe an image, video or audio file in the workspace, through the model itself.",
            _obj(path=_PATH),
            source="builtin",
        )
    )
    specs.append(
        ToolSpec(
            "answer_question",
            "Answer a question about an image, video or audio file in the workspace, through the model itself.",
            _obj(path=_PATH, question=_PROMPT),
            source="builtin",
            react_args=["path", "question"],
        )
    )
    return specs


def attach_cpu_backends(registry: Registry) -> None:
    """Give declared tools the real backends shipped here (run in a killable subprocess)."""
    spec = registry.get("Edge Detection On Image")
    if spec is not None and spec.backend is None:
        registry.set_backend(spec.name, edge_detection, isolation="subprocess")


def bind_model_hooks(
    registry: Registry,
    *,
    caption: Callable[[str], str] | None = None,
    answer: Callable[[str, str], str] | None = None,
    generate: dict[str, Callable[[str], str]] | None = None,
) -> list[str]:
    """Attach the model's own abilities as in-process backends; returns the tool names bound.

    ``caption(path) -> text``, ``answer(path, question) -> text``, ``generate[modality](prompt) -> path``.
    """
    bound: list[str] = []

    def bind(name: str, fn: Callable) -> None:
        spec = registry.get(name)
        # declared tools get the model's ability; a same-named tool that already has its own backend
        # (a user tool, the demo set's generate_image) keeps it
        if spec is not None and (spec.backend is None or spec.source == "builtin"):
            registry.set_backend(name, fn, isolation="inprocess")
            bound.append(spec.name)

    if caption is not None:
        bind("caption", lambda path: caption(path))
        bind("Get Photo Description", lambda image_path: caption(image_path))
    if answer is not None:
        bind("answer_question", lambda path, question: answer(path, question))
        bind("Answer Question About The Image", lambda image_path, question: answer(image_path, question))
    for modality, fn in (generate or {}).items():
        bind(f"generate_{modality}", lambda prompt, _fn=fn: _fn(prompt))
        if modality == "image":
            bind("Generate Image From User Input Text", lambda text, _fn=fn: _fn(text))
    return bound
