"""Renderer throughput: records/s and tokens/s on synthetic records (image chats, tool episodes, generation).

    PYTHONPATH=code OMP_NUM_THREADS=1 python scripts/bench_render.py --records 3000 --vocab 4000

Builds a Llama-style sentencepiece tokenizer (toollmm.model.tiny_tokenizer) on the records' text, adds the token
contract, then times Renderer.render, schema validation and (for comparison) apply_chat_template.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from transformers import AutoTokenizer

from toollmm.core.tokens import TokenContract
from toollmm.core.toolcall import tool_call_entry
from toollmm.data.chat_template import install_chat_template
from toollmm.data.records import check_record
from toollmm.data.render import Renderer
from toollmm.model.tiny_tokenizer import build_sentencepiece_tokenizer

WORDS = (
    "the a red blue green circle square triangle moves left right on white background small large image "
    "shows there is are two three people dog cat street city car light evening picture detect edges count "
    "objects result saved file png answer question because which where what how many"
).split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def make_record(rng: random.Random, k: int) -> dict:
    kind = k % 3
    if kind == 0:  # LLaVA-style multi-turn image chat
        msgs = []
        for t in range(3):
            q = ("<image>\n" if t == 0 else "") + sentence(rng, 12)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": sentence(rng, 60)}]
        return {"id": f"chat-{k}", "source": "bench", "images": [f"{k}.jpg"], "messages": msgs}
    if kind == 1:  # tool episode
        call = tool_call_entry("count_objects", {"image": f"img/{k}.png", "kind": rng.choice(WORDS)})
        msgs = [
            {"role": "user", "content": sentence(rng, 20)},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "count_objects", "content": sentence(rng, 8)},
            {"role": "assistant", "content": sentence(rng, 30)},
        ]
        return {"id": f"tool-{k}", "source": "bench", "messages": msgs}
    gen = [{"modality": "image", "caption": sentence(rng, 10)}]
    msgs = [
        {"role": "user", "content": sentence(rng, 15)},
        {"role": "assistant", "content": sentence(rng, 12), "generate": gen},
    ]
    return {"id": f"gen-{k}", "source": "bench", "messages": msgs}


def rate(fn, items) -> tuple[float, float]:
    t0 = time.perf_counter()
    out = [fn(x) for x in items]
    return len(items) / (time.perf_counter() - t0), out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=3000)
    ap.add_argument("--vocab", type=int, default=4000)
    args = ap.parse_args(argv)
    rng = random.Random(0)
    records = [make_record(rng, k) for k in range(args.records)]
    texts = [m["content"] for r in records[:2000] for m in r["messages"]]
    with tempfile.TemporaryDirectory() as d:
        tok = AutoTokenizer.from_pretrained(build_sentencepiece_tokenizer(texts, d, vocab_size=args.vocab))
    contract = TokenContract()
    contract.add_to(tok)
    install_chat_template(tok, "vicuna_v1", contract)
    renderer = Renderer(tok, media_tokens={"image": 1})
    r_rate, samples = rate(renderer.render, records)
    tokens = sum(len(s) for s in samples)
    v_rate, _ = rate(check_record, records)
    sub = records[:500]
    a_rate, _ = rate(lambda r: tok.apply_chat_template(r["messages"], return_dict=False), sub)
    print(f"records: {len(records)}, mean tokens/record: {tokens / len(records):.0f}")
    print(
        f"Renderer.render:        {r_rate:8.0f} records/s  ({r_rate * tokens / len(records):,.0f} tokens/s)"
    )
    print(f"schema check_record:    {v_rate:8.0f} records/s")
    print(f"apply_chat_template:    {a_rate:8.0f} records/s  (for comparison; no labels)")


if __name__ == "__main__":
    main()
