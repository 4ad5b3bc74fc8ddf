"""Captions and phrasings of the demo corpus's media tasks (x2t, t2x, instruct, and their text-only copies).

A caption names every attribute of its modality (``media.ATTRIBUTES``), in a fixed order, so the
caption of a render is a pure function of its attributes: "a red circle", "a high fast pulsing tone",
"a green circle moving up".
"""

from __future__ import annotations

import itertools

import numpy as np

from .media import ATTRIBUTES

PULSE_WORDS = {"steady": "steady", "slow": "slow pulsing", "fast": "fast pulsing"}
MEDIUM_NOUN = {"image": "image", "audio": "sound", "video": "video"}


def caption(modality: str, attrs: dict) -> str:
    if modality == "image":
        return f"a {attrs['colour']} {attrs['shape']}"
    if modality == "audio":
        return f"a {attrs['pitch']} {PULSE_WORDS[attrs['pulse']]} tone"
    if modality == "video":
        return f"a {attrs['colour']} circle moving {attrs['direction']}"
    raise ValueError(f"unknown modality {modality!r}")


def attribute_words(modality: str, attrs: dict) -> str:
    """The bare attribute values ("red circle"): what the copy-pattern LM text puts where a medium goes."""
    return " ".join(attrs[a] for a in ATTRIBUTES[modality])


def combos(modality: str) -> list[dict]:
    """Every attribute combination of ``modality`` in a fixed order."""
    names = list(ATTRIBUTES[modality])
    return [dict(zip(names, vals)) for vals in itertools.product(*ATTRIBUTES[modality].values())]


# ------------------------------------------------------------------------------------- x2t / t2x
X2T_PROMPTS = {
    "image": ["Describe the image.", "What is in this picture?", "Write a short caption for the image.",
              "What do you see?", "Caption this image."],
    "audio": ["Describe the sound.", "What do you hear?", "Write a short caption for this audio.",
              "What kind of tone is this?", "Caption this sound."],
    "video": ["Describe the video.", "What happens in this video?", "Write a short caption for the video.",
              "What do you see moving?", "Caption this clip."],
}  # fmt: skip

T2X_PROMPTS = {
    "image": ["Generate an image of {c}.", "Draw {c}.", "Please create a picture of {c}.",
              "Show me {c}.", "Make an image showing {c}."],
    "audio": ["Generate a sound of {c}.", "Play {c}.", "Please create audio of {c}.",
              "Let me hear {c}.", "Make a sound: {c}."],
    "video": ["Generate a video of {c}.", "Animate {c}.", "Please create a clip of {c}.",
              "Show me a video of {c}.", "Make a video showing {c}."],
}  # fmt: skip
T2X_ANSWERS = {
    "image": ["Here is {c}.", "Sure, here is an image of {c}."],
    "audio": ["Here is {c}.", "Sure, here is the sound of {c}."],
    "video": ["Here is {c}.", "Sure, here is a video of {c}."],
}


def x2t_turn(modality: str, rng: np.random.Generator) -> str:
    return X2T_PROMPTS[modality][rng.integers(len(X2T_PROMPTS[modality]))]


def t2x_turns(modality: str, cap: str, rng: np.random.Generator) -> tuple[str, str]:
    q = T2X_PROMPTS[modality][rng.integers(len(T2X_PROMPTS[modality]))]
    a = T2X_ANSWERS[modality][rng.integers(len(T2X_ANSWERS[modality]))]
    return q.format(c=cap), a.format(c=cap)


# ------------------------------------------------------------------------------------- instruct
# (question templates, answer template) per attribute; {v} = the attribute's value, {o} = another value
QUESTIONS = {
    "image": {
        "colour": (["What colour is the shape?", "Which colour does the shape have?"], "It is {v}."),
        "shape": (["What shape is it?", "Which shape is shown?"], "It is a {v}."),
    },
    "audio": {
        "pitch": (["Is the tone low, middle or high?", "How high is the pitch?"], "The pitch is {v}."),
        "pulse": (["Is the tone steady or pulsing?", "How does the tone pulse?"], "It is {pw}."),
    },
    "video": {
        "colour": (["What colour is the circle?", "Which colour is the moving circle?"], "It is {v}."),
        "direction": (["Which way is the circle moving?", "In which direction does it move?"],
                      "It is moving {v}."),
    },
}  # fmt: skip
YESNO = {
    "image": {"colour": "Is the shape {o}?", "shape": "Is it a {o}?"},
    "audio": {"pitch": "Is the pitch {o}?", "pulse": "Is the tone {opw}?"},
    "video": {"colour": "Is the circle {o}?", "direction": "Is the circle moving {o}?"},
}
DESCRIBE = ["Describe it in a few words.", "Give me a short caption."]


def _fill(template: str, modality: str, attr: str, value: str) -> str:
    pw = PULSE_WORDS.get(value, value) if modality == "audio" and attr == "pulse" else value
    return template.format(v=value, o=value, pw=pw, opw=pw)


def instruct_turns(modality: str, attrs: dict, rng: np.random.Generator, max_turns: int = 3) -> list:
    """1..max_turns (question, answer) pairs about single attributes, a yes/no check or the caption."""
    names = list(ATTRIBUTES[modality])
    kinds = [("ask", a) for a in names] + [("yesno", a) for a in names] + [("describe", None)]
    n = int(rng.integers(1, max_turns + 1))
    turns = []
    for i in rng.permutation(len(kinds))[:n]:
        kind, attr = kinds[int(i)]
        if kind == "describe":
            turns.append((DESCRIBE[rng.integers(len(DESCRIBE))], caption(modality, attrs).capitalize() + "."))
        elif kind == "ask":
            qs, ans = QUESTIONS[modality][attr]
            turns.append((qs[rng.integers(len(qs))], _fill(ans, modality, attr, attrs[attr])))
        else:
            values = ATTRIBUTES[modality][attr]
            asked = attrs[attr] if rng.random() < 0.5 else values[rng.integers(len(values))]
            q = _fill(YESNO[modality][attr], modality, attr, asked)
            truth = _fill(QUESTIONS[modality][attr][1], modality, attr, attrs[attr])
            turns.append((q, "Yes." if asked == attrs[attr] else "No, " + truth[0].lower() + truth[1:]))
    return turns
