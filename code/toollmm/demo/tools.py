"""The demo tool set: specs (``DEMO_TOOLS``), pure-Python backends (``run_demo_tool``) and conversations.

Every tool's result is a deterministic function of its arguments, so inference can really run them and
the corpus's tool messages are exactly what the backend returns (``json.dumps(result, sort_keys=True)``).
Held-out conversations use argument values and user phrasings that never occur in training:
numbers are split by a fixed hash (``number_split``), cities, words and image prompts come from
disjoint lists, and each tool has disjoint train / held-out request templates.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np

from .media import ATTRIBUTES
from .text import caption

OPS = {
    "add": ("plus", "+"),
    "subtract": ("minus", "-"),
    "multiply": ("times", "*"),
    "divide": ("divided by", "/"),
}
UNITS = {  # (from, to): factor, or None for the temperature formula
    ("km", "miles"): 0.621371, ("miles", "km"): 1.609344, ("kg", "lb"): 2.204623, ("lb", "kg"): 0.453592,
    ("m", "ft"): 3.280840, ("ft", "m"): 0.3048, ("celsius", "fahrenheit"): None, ("fahrenheit", "celsius"): None,
}  # fmt: skip
UNIT_NAMES = sorted({u for pair in UNITS for u in pair})
DAYS = ["today", "tomorrow", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy"]
CITIES = {
    "train": ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Warsaw", "Lisbon",
              "Dublin", "Oslo", "Helsinki", "Athens", "Cairo", "Tokyo", "Seoul", "Beijing", "Delhi",
              "Sydney", "Toronto", "Chicago", "Boston", "Denver", "Lima", "Geneva", "Munich", "Milan",
              "Naples", "Kyoto", "Manila", "Jakarta", "Bangkok", "Dakar", "Accra", "Lagos", "Havana",
              "Bogota", "Caracas", "Santiago", "Montreal", "Seattle", "Phoenix", "Dallas", "Miami",
              "Glasgow", "Krakow", "Budapest", "Riga", "Tallinn", "Sofia", "Zagreb", "Valencia"],
    "heldout": ["Zurich", "Nairobi", "Osaka", "Quito", "Tunis", "Hanoi", "Perth", "Austin"],
}  # fmt: skip
WORDS = {
    "train": ["banana", "apple", "mississippi", "letter", "window", "tomato", "balloon", "coffee",
              "pepper", "rabbit", "bottle", "cherry", "summer", "yellow", "puzzle", "kitten",
              "garden", "butter", "pizza", "zebra", "jacket", "quilt", "oxygen", "parrot",
              "dolphin", "pumpkin", "volcano", "candle", "meadow", "pillow", "bubble", "rocket"],
    "heldout": ["giraffe", "hammock", "noodles", "savanna", "whisker", "lemonade"],
}  # fmt: skip
_CONSONANTS, _VOWELS = "bcdfghjklmnpqrstvwxz", "aeiouy"
HELDOUT_IMAGE_COMBOS = 6  # image prompts of generate_image: one held-out shape per colour


def _spec(name: str, description: str, properties: dict, required: list[str]) -> dict:
    params = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


DEMO_TOOLS = [
    _spec("calculator", "Do one arithmetic operation on two numbers.",
          {"a": {"type": "number"}, "b": {"type": "number"}, "op": {"type": "string", "enum": list(OPS)}},
          ["a", "b", "op"]),
    _spec("unit_convert", "Convert a value between units of length, mass or temperature.",
          {"value": {"type": "number"}, "from_unit": {"type": "string", "enum": UNIT_NAMES},
           "to_unit": {"type": "string", "enum": UNIT_NAMES}}, ["value", "from_unit", "to_unit"]),
    _spec("weather", "Weather forecast for a city on a day.",
          {"city": {"type": "string"}, "day": {"type": "string", "enum": DAYS}}, ["city", "day"]),
    _spec("count_letters", "Count how often a letter occurs in a word.",
          {"word": {"type": "string"}, "letter": {"type": "string", "minLength": 1, "maxLength": 1}},
          ["word", "letter"]),
    _spec("generate_image", "Generate an image from a text prompt.",
          {"prompt": {"type": "string"}}, ["prompt"]),
]  # fmt: skip
TOOL_NAMES = [t["function"]["name"] for t in DEMO_TOOLS]


def _num(x: float):
    x = round(float(x), 2)
    return int(x) if x == int(x) else x


def run_demo_tool(name: str, args: dict) -> dict:
    """The reference backend of each demo tool (pure Python, deterministic). Raises ValueError on bad input."""
    if name == "calculator":
        a, b, op = args["a"], args["b"], args["op"]
        if op == "divide" and b == 0:
            raise ValueError("calculator: division by zero")
        res = {"add": a + b, "subtract": a - b, "multiply": a * b, "divide": a / b if b else 0}[op]
        return {"result": _num(res)}
    if name == "unit_convert":
        pair = (args["from_unit"], args["to_unit"])
        if pair not in UNITS:
            raise ValueError(f"unit_convert: cannot convert {pair[0]} to {pair[1]}")
        v = args["value"]
        if pair == ("celsius", "fahrenheit"):
            out = v * 9 / 5 + 32
        elif pair == ("fahrenheit", "celsius"):
            out = (v - 32) * 5 / 9
        else:
            out = v * UNITS[pair]
        return {"result": _num(out), "unit": pair[1]}
    if name == "weather":
        h = hashlib.sha256(f"{args['city'].strip().lower()}|{args['day']}".encode()).digest()
        return {"city": args["city"], "day": args["day"], "condition": CONDITIONS[h[0] % len(CONDITIONS)],
                "temperature_c": int(h[1] % 41) - 5}  # fmt: skip
    if name == "count_letters":
        return {"count": args["word"].lower().count(args["letter"].lower())}
    if name == "generate_image":
        digest = hashlib.sha256(args["prompt"].encode()).hexdigest()[:10]
        return {"image": f"image_{digest}.png"}
    raise ValueError(f"unknown demo tool {name!r}; known: {TOOL_NAMES}")


def number_split(n: int) -> str:
    """Fixed partition of integers: about a fifth are held-out values, never used in training."""
    return "heldout" if zlib.crc32(str(n).encode()) % 5 == 0 else "train"


def _number(rng, split: str, lo: int = 2, hi: int = 999) -> int:
    while True:
        n = int(rng.integers(lo, hi + 1))
        if number_split(n) == split:
            return n


def image_prompts(split: str) -> list[str]:
    """Image captions for generate_image: held-out = one shape per colour, never prompted in training."""
    colours, shapes = ATTRIBUTES["image"]["colour"], ATTRIBUTES["image"]["shape"]
    held = {(c, shapes[i % len(shapes)]) for i, c in enumerate(colours[:HELDOUT_IMAGE_COMBOS])}
    pairs = [(c, s) for c in colours for s in shapes if ((c, s) in held) == (split == "heldout")]
    return [caption("image", {"colour": c, "shape": s}) for c, s in pairs]


# Made-up spellings for the LM's copy drills: onsets, vowels and codas with the clusters and doubled letters
# real words have ("ch", "wh", "ff", "mm"), so the drills cover the tokenizer pieces an unseen word splits into.
_ONSETS = list(_CONSONANTS) + ["ch", "sh", "th", "ph", "wh", "tr", "br", "gr", "st", "sk", "sl", "pl", "kr",
                              "sn"]  # fmt: skip
_NUCLEI = list(_VOWELS) + ["ai", "ea", "oo", "ou", "ie", "ee"]
_CODAS = ["", "", "", "", "n", "r", "s", "t", "l", "m", "k", "ck", "ff", "mm", "nn", "ss", "rr", "x", "z",
          "ch"]  # fmt: skip


def pseudo_name(rng: np.random.Generator, capital: bool) -> str:
    """A made-up 2-3 syllable name (never contains a held-out value): LM text that teaches copying any
    spelling. Syllables are (onset) vowel (coda), onsets and codas including clusters and doubled letters."""
    while True:
        name = ""
        for _ in range(int(rng.integers(2, 4))):
            onset = _ONSETS[rng.integers(len(_ONSETS))] if rng.random() < 0.85 else ""
            name += onset + _NUCLEI[rng.integers(len(_NUCLEI))] + _CODAS[rng.integers(len(_CODAS))]
        name = name.capitalize() if capital else name
        if 4 <= len(name) <= 10 and not any(
            h.lower() in name.lower() for h in CITIES["heldout"] + WORDS["heldout"]
        ):
            return name


def sample_arguments(tool: str, split: str, rng: np.random.Generator, pseudo: bool = False) -> dict:
    """Arguments from ``split``'s value pools; ``pseudo`` = made-up cities and words (LM text only)."""
    if tool == "calculator":
        op = list(OPS)[rng.integers(len(OPS))]
        if op != "divide":
            return {"a": _number(rng, split), "b": _number(rng, split), "op": op}
        while True:  # exact quotients, every value from this split
            b, q = _number(rng, split, 2, 40), _number(rng, split, 2, 40)
            if number_split(b * q) == split:
                return {"a": b * q, "b": b, "op": op}
    if tool == "unit_convert":
        frm, to = list(UNITS)[rng.integers(len(UNITS))]
        return {"value": _number(rng, split, 2, 500), "from_unit": frm, "to_unit": to}
    if tool == "weather":
        city = pseudo_name(rng, True) if pseudo else CITIES[split][rng.integers(len(CITIES[split]))]
        return {"city": city, "day": DAYS[rng.integers(len(DAYS))]}
    if tool == "count_letters":
        word = pseudo_name(rng, False) if pseudo else WORDS[split][rng.integers(len(WORDS[split]))]
        letter = word[rng.integers(len(word))] if rng.random() < 0.85 else "aeiouxz"[rng.integers(7)]
        return {"word": word, "letter": letter}
    if tool == "generate_image":
        prompts = image_prompts(split)
        return {"prompt": prompts[rng.integers(len(prompts))]}
    raise ValueError(f"unknown demo tool {tool!r}")


def canonical_call(name: str, args: dict) -> dict:
    return {"name": name, "arguments": json.loads(json.dumps(args, sort_keys=True))}


# ------------------------------------------------------------------------------ conversations
# Request templates per tool and split (disjoint sets); answer templates are shared.
REQUESTS = {
    "calculator": {
        "train": ["What is {a} {w} {b}?", "Calculate {a} {s} {b}.", "Can you work out {a} {w} {b}?",
                  "Please compute {a} {s} {b}.", "How much is {a} {w} {b}?", "Use the calculator: {a} {s} {b}."],
        "heldout": ["I need the result of {a} {w} {b}.", "Tell me what {a} {s} {b} equals.",
                    "Quick maths: {a} {w} {b}?"],
    },
    "unit_convert": {
        "train": ["Convert {v} {f} to {t}.", "How many {t} is {v} {f}?", "What is {v} {f} in {t}?",
                  "Please change {v} {f} into {t}.", "I have {v} {f}, how much is that in {t}?",
                  "Express {v} {f} in {t}."],
        "heldout": ["Could you turn {v} {f} into {t} for me?", "{v} {f} equals how many {t}?",
                    "Give me {v} {f} converted to {t}."],
    },
    "weather": {
        "train": ["What is the weather in {c} {d}?", "Will it rain in {c} {d}?",
                  "Weather forecast for {c} {d}, please.", "How warm is it in {c} {d}?",
                  "Tell me the weather in {c} {d}.", "What weather should I expect in {c} {d}?"],
        "heldout": ["Is it going to be nice in {c} {d}?", "I am travelling to {c}; what is the forecast {d}?",
                    "Check the weather for {c} {d}."],
    },
    "count_letters": {
        "train": ["How many times does the letter {l} appear in {w}?", "Count the letter {l} in {w}.",
                  "How many '{l}' are in the word {w}?", "In the word {w}, how often does {l} occur?",
                  "Please count how many {l} letters {w} has.", "Tell me the number of {l} in {w}."],
        "heldout": ["Find how frequently {l} shows up in {w}.", "What is the count of letter {l} within {w}?",
                    "Look at {w} and count the {l} characters."],
    },
    "generate_image": {
        "train": ["Use the image tool to draw {p}.", "Call the image generator for {p}.",
                  "Generate an image of {p} with the tool.", "I want a picture of {p}; please use the tool.",
                  "Create an image of {p} using the tool.", "Please render {p} with the image tool."],
        "heldout": ["Have the image generator make {p}.", "Could you produce a picture of {p} via the tool?",
                    "Get the tool to paint {p}."],
    },
}  # fmt: skip
# More training phrasings per tool (still disjoint from the held-out ones): with six fixed sentences a tiny
# LM learns the sentences, not the request; with these and the openers/closers below it has to find the
# tool in the content words and copy the values, which is what the unseen held-out phrasings test.
EXTRA_TRAIN_REQUESTS = {
    "calculator": ["Compute {a} {w} {b}.", "What do you get for {a} {s} {b}?", "Solve {a} {s} {b}.",
                   "{a} {w} {b} is what?", "Find {a} {w} {b}.", "Evaluate {a} {s} {b}, please.",
                   "What does {a} {w} {b} give?", "Work out {a} {s} {b}."],
    "unit_convert": ["Change {v} {f} to {t}.", "Convert {v} {f} into {t}, please.", "{v} {f} in {t}?",
                     "What does {v} {f} come to in {t}?", "How much is {v} {f} in {t}?",
                     "Show {v} {f} as {t}.", "{v} {f} to {t}, please.", "Work out {v} {f} in {t}."],
    "weather": ["Forecast for {c} {d}?", "What will the weather be like in {c} {d}?", "Is it sunny in {c} {d}?",
                "Weather in {c} {d}?", "How is the weather going to be in {c} {d}?",
                "Should I take an umbrella in {c} {d}?", "Any rain expected in {c} {d}?",
                "Get me the forecast for {c} {d}."],
    "count_letters": ["Count how many {l} are in {w}.", "How often is {l} in {w}?", "Number of {l} letters in {w}?",
                      "In {w}, count the letter {l}.", "How many {l} does {w} contain?",
                      "Letter count of {l} in {w}, please.", "Count {l} in the word {w}.",
                      "How many letters {l} has {w}?"],
    "generate_image": ["Draw {p} with the image tool.", "Make a picture of {p} using the tool.",
                       "Use the generator to create {p}.", "Please generate {p} with the tool.",
                       "Ask the image tool for {p}.", "Paint {p} with the image generator.",
                       "Let the image tool draw {p}.", "Use the tool to make an image of {p}."],
}  # fmt: skip
# A third set: other sentence shapes (values first, values last, clauses before and after, terse forms), so
# the LM finds an argument by what it is and where it stands among the others, not by one sentence it has
# memorised. Held-out values inside training templates were 0.94 exact for the stage-0 LM, the held-out
# requests 0.55 (0.74 with this set): the phrasing, not the copy, was what failed. No slot-free word 4-gram of
# a held-out template occurs in any training request (tests/demo/test_demo_corpus.py).
VARIED_TRAIN_REQUESTS = {
    "calculator": ["Do the math: {a} {w} {b}.", "My question is {a} {s} {b}.", "Could you figure out {a} {w} {b}?",
                   "I want to know {a} {w} {b}.", "Give me the answer to {a} {s} {b}.",
                   "What comes out of {a} {w} {b}?", "Run the numbers on {a} {s} {b}.", "{a} {s} {b} = ?",
                   "{a} {w} {b}, what is that?", "Determine {a} {w} {b}.", "The value of {a} {w} {b}, please.",
                   "Help me with this problem: {a} {s} {b}.", "Can I get {a} {w} {b}?",
                   "I wonder what {a} {w} {b} makes.", "Work this out for me: {a} {s} {b}.",
                   "Say what {a} {w} {b} is.", "Using the calculator, what is {a} {s} {b}?",
                   "Arithmetic: {a} {s} {b}.", "Show me {a} {w} {b}.", "So, {a} {s} {b}?",
                   "What would {a} {w} {b} be?", "Let me know the value of {a} {s} {b}.",
                   "{a} {w} {b}. What do you get?", "My homework says {a} {s} {b}; what is it?",
                   "Answer this one: {a} {w} {b}.", "Here is a sum for the calculator: {a} {s} {b}.",
                   "I have {a}; {w} {b} makes what?", "Start with {a}, {w} {b}. Result?",
                   "Mental arithmetic check: {a} {s} {b}.", "We have {a} {w} {b}; what number is that?",
                   "Between us, what is {a} {s} {b}?", "The calculation I need: {a} {s} {b}.",
                   "For my budget: {a} {w} {b}?", "Could the calculator do {a} {s} {b}?",
                   "Hey calculator, {a} {w} {b}.", "Numbers: {a} {s} {b}. Answer?", "Let's see {a} {w} {b}.",
                   "Kindly compute {a} {w} {b} for me.", "I am stuck on {a} {s} {b}; help?",
                   "Figure this: {a} {w} {b}.", "Tell me the outcome of {a} {s} {b}."],
    "unit_convert": ["Please express {v} {f} as {t}.", "How many {t} are {v} {f}?",
                     "How many {t} do {v} {f} make?", "I measured {v} {f}. What is that in {t}?",
                     "Tell me {v} {f} in {t}.", "What are {v} {f} in {t}?", "Switch {v} {f} over to {t}.",
                     "Convert from {f} to {t}: {v}.", "From {f} to {t}, please: {v}.",
                     "{v} {f} is how much in {t}?", "Rewrite {v} {f} using {t}.",
                     "What is the {t} value of {v} {f}?", "Can you change {v} {f} to {t}?",
                     "I need {v} {f} in {t}.", "Go from {v} {f} to {t}.", "Quick conversion: {v} {f} to {t}.",
                     "Unit conversion of {v} {f} into {t}.", "What do {v} {f} equal in {t}?",
                     "My recipe says {v} {f}; how much is it in {t}?", "The sign reads {v} {f}. In {t}?",
                     "{f} to {t}: {v}.", "Put {v} {f} in {t}, please.", "Measure {v} {f} in {t}.",
                     "If something is {v} {f}, what is it in {t}?", "I am looking at {v} {f}; give it in {t}.",
                     "What would {v} {f} be in {t}?", "Help me convert {v} {f} to {t}.", "{v} {f}, as {t} please.",
                     "Need {v} {f} expressed in {t}.", "How much is {v} {f} when measured in {t}?",
                     "Translate {v} {f} into {t}.", "A value of {v} {f}: how much in {t}?",
                     "In {t}, what is {v} {f}?", "In {t}, how much are {v} {f}?", "Using {t}, write {v} {f}.",
                     "Converting {v} {f} to {t}, what do I get?", "Do a unit conversion: {v} {f} into {t}."],
    "weather": ["Do I need a jacket in {c} {d}?", "Is it cold in {c} {d}?", "How hot will {c} be {d}?",
                "Give the forecast for {c} {d}.", "I am going to {c}. Weather {d}?",
                "Visiting {c} {d}; how is the weather?", "{c} {d}: what is the weather?",
                "Look up the weather in {c} {d}.", "Weather report for {c} {d}.", "Find the weather in {c} {d}.",
                "Will {c} be sunny {d}?", "Is {c} rainy {d}?", "Temperature in {c} {d}?",
                "My flight lands in {c} {d}; what weather can I expect?", "Should I expect snow in {c} {d}?",
                "Tell me if it rains in {c} {d}.", "What is it like outside in {c} {d}?",
                "Can you get the forecast in {c} {d}?", "Weather check: {c}, {d}.",
                "The weather in {c} {d}, please.", "We fly to {c} {d}. Will it be warm?",
                "Planning a walk in {c} {d}; any sun?", "For {c} {d}, what does the forecast say?",
                "Over in {c} {d}, how is the weather looking?", "Heading to {c} {d}. What's the weather?",
                "In {c} {d}, will it rain?", "Is there sun in {c} {d}?", "What should I wear in {c} {d}?",
                "My sister lives in {c}; weather {d}?", "Forecast please: {c}, {d}.", "Any wind in {c} {d}?",
                "{c} weather {d}?", "Can I go outside in {c} {d}?", "How cloudy is {c} {d}?",
                "I fly to {c} {d}; should I pack a coat?", "We are visiting {c}; weather {d}, please.",
                "Weather for {c}, {d}?", "Rain or shine in {c} {d}?"],
    "count_letters": ["How many {l} can you find in {w}?", "Count every {l} in {w}.",
                      "In {w}, how many times is {l} used?", "{w}: how many {l}?",
                      "Tell me how many {l} the word {w} has.", "Check {w} for the letter {l} and count it.",
                      "What number of {l} letters does {w} have?", "Spell {w} and tell me how many {l} it has.",
                      "The word {w}: count {l}.", "Letter {l} in {w}, how many?",
                      "How many times do you see {l} in {w}?", "Report how many {l} are in {w}.",
                      "I want to know how many {l} are in {w}.", "Occurrences of {l} in {w}?",
                      "Count up the {l} letters in {w}.", "{w} has how many {l}?", "Tally the letter {l} in {w}.",
                      "Please find the number of {l} in {w}.", "Take the word {w}. How many {l} does it have?",
                      "Count {l}: {w}.", "My word is {w}; count its {l} letters.",
                      "Go through {w} and tally each {l}.", "In the word {w}, count {l}.",
                      "Using {w}, how many {l} letters are there?", "{l} in {w}: how many times?",
                      "How many of the letter {l} are in {w}?", "For {w}, give the number of {l}.",
                      "Scan {w} for {l}; how many?", "I typed {w}. How many {l} did I type?",
                      "Does {w} have many {l}? Count them.", "Count all the {l} in {w}, please.",
                      "Letter {l}, word {w}: count?", "Find every {l} in {w} and count.",
                      "What is the number of {l} in {w}?", "Count the {l} letters of {w}."],
    "generate_image": ["Draw me {p} with the tool.", "I need an image of {p}; use the generator.",
                       "Produce {p} with the image tool.", "Sketch {p} using the image tool.",
                       "Can the image tool make {p}?", "Image tool: {p}.", "Use the tool and draw {p}.",
                       "Render {p} for me with the tool.", "Generate {p} using the image generator.",
                       "Please have the tool draw {p}.", "Illustrate {p} with the tool.",
                       "Make me {p} with the image tool.", "Call the tool to draw {p}.",
                       "I would like an image showing {p}, made by the tool.", "With the generator, draw {p}.",
                       "Show me {p}: use the image tool.", "The image tool should draw {p}.",
                       "Drawing request for the tool: {p}.", "Use the image tool: {p}, please.",
                       "Could the tool draw {p}?", "I want the generator to draw {p}.",
                       "Draw {p} using the generator.", "Picture request: {p}, with the tool.",
                       "Let the generator render {p}.", "With the image tool, make {p}.",
                       "Generate a picture of {p} with the tool.", "Tool, please draw {p}.",
                       "An image of {p}, from the image tool."],
}  # fmt: skip
for _tool in REQUESTS:
    REQUESTS[_tool]["train"] = (
        REQUESTS[_tool]["train"] + EXTRA_TRAIN_REQUESTS[_tool] + VARIED_TRAIN_REQUESTS[_tool]
    )
#: said before / after a training request (never in held-out requests)
OPENERS = [
    "",
    "",
    "",
    "Hi. ",
    "Hello! ",
    "Hey, ",
    "Question: ",
    "One thing: ",
    "OK, ",
    "Right, ",
    "Help me out. ",
    "Quick question: ",
    "Excuse me, ",
    "Good morning. ",
    "I have a question. ",
    "Can you help? ",
    "So, ",
    "Please, ",
    "Listen, ",
]
CLOSERS = ["", "", "", " Thanks.", " Thank you.", " Cheers!", " Please be precise.", " Go ahead.", " Thanks a lot.",
           " I am in a hurry.", " That is all.", " Much appreciated."]  # fmt: skip
ANSWERS = {
    "calculator": ["{a} {w} {b} is {r}.", "The answer is {r}."],
    "unit_convert": ["{v} {f} is {r} {t}.", "That is {r} {t}."],
    "weather": ["In {c} {d} it will be {cond} at {temp} degrees Celsius.", "The forecast for {c} {d}: {cond}, {temp} C."],
    "count_letters": ["The letter {l} appears {n} times in {w}.", "{w} contains {n} of the letter {l}."],
    "generate_image": ["Here is the image of {p}: {image}.", "Done, I saved {p} as {image}."],
}  # fmt: skip


def _slots(tool: str, args: dict, result: dict | None = None) -> dict:
    s: dict = {}
    if tool == "calculator":
        s = {"a": args["a"], "b": args["b"], "w": OPS[args["op"]][0], "s": OPS[args["op"]][1]}
    elif tool == "unit_convert":
        s = {"v": args["value"], "f": args["from_unit"], "t": args["to_unit"]}
    elif tool == "weather":
        s = {
            "c": args["city"],
            "d": args["day"] if args["day"] in ("today", "tomorrow") else "on " + args["day"],
        }
    elif tool == "count_letters":
        s = {"w": args["word"], "l": args["letter"]}
    elif tool == "generate_image":
        s = {"p": args["prompt"]}
    if result:
        s |= {"r": result.get("result"), "cond": result.get("condition"), "temp": result.get("temperature_c"),
              "n": result.get("count"), "image": result.get("image")}  # fmt: skip
    return s


def tool_conversation(
    tool: str, split: str, rng: np.random.Generator, pseudo: bool = False
) -> tuple[list[dict], dict]:
    """user request -> assistant tool call -> tool result -> assistant answer; returns (messages, info)."""
    args = sample_arguments(tool, split, rng, pseudo)
    result = run_demo_tool(tool, args)
    t = int(rng.integers(len(REQUESTS[tool][split])))
    template = REQUESTS[tool][split][t]
    request = template.format(**_slots(tool, args))
    # a value first is never re-cased: "km to miles: 5" (not "Km"), "Hey, Paris ..." (not "paris")
    recase = not template.startswith("{")
    if recase:
        request = request[0].upper() + request[1:]
    if split == "train":
        opener, closer = OPENERS[rng.integers(len(OPENERS))], CLOSERS[rng.integers(len(CLOSERS))]
        lower = recase and opener.endswith(", ")
        request = opener + (request[0].lower() + request[1:] if lower else request) + closer
    answer = ANSWERS[tool][rng.integers(len(ANSWERS[tool]))].format(**_slots(tool, args, result))
    call = {"type": "function", "function": canonical_call(tool, args)}
    messages = [
        {"role": "user", "content": request},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "name": tool, "content": json.dumps(result, sort_keys=True)},
        {"role": "assistant", "content": answer[0].upper() + answer[1:]},
    ]
    return messages, {"tool": tool, "template": f"{tool}/{split}/{t}", "arguments": args, "result": result}
