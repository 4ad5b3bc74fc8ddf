"""Shared test setup: offline, quiet, tiny. Every test builds its models from configs and generated data."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402

from toollmm.core.paths import ensure_torch_extensions_dir  # noqa: E402

ensure_torch_extensions_dir()

SAMPLE_TEXT = [
    "a red circle moving left",
    "a small blue square on a white background",
    "USER: what is in the picture? ASSISTANT: a green triangle.",
    "### Human: describe the sound ### Assistant: a high tone",
    "Thought: Do I need to use a tool? Yes\nAction: Edge Detection On Image\nAction Input: image/abc.png",
    '{"name": "generate_image", "arguments": {"prompt": "a red circle"}}',
    "the quick brown fox jumps over the lazy dog 0123456789",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """A Llama-style sentencepiece tokenizer folder (no toollmm tokens), like a Vicuna checkpoint's."""
    from toollmm.model.tiny_tokenizer import build_sentencepiece_tokenizer

    return build_sentencepiece_tokenizer(SAMPLE_TEXT * 20, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_stage_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A loadable stage folder (``save_stage``) over tiny base models (ImageBind, Llama, three diffusers
    pipelines) with the demo tool set declared; see tests/inference_fixtures.py."""
    from inference_fixtures import build_tiny_stage

    return build_tiny_stage(tmp_path_factory.mktemp("tiny_stage"), tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def train_world(tmp_path_factory):
    """Demo corpus (--small), tiny base models and a per-stage config YAML (tests/_train_world.py)."""
    from _train_world import build_world

    return build_world(tmp_path_factory.mktemp("train_world"))
