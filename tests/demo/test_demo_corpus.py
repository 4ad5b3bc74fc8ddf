"""The demo corpus (``--small``): deterministic, schema-valid, held-out really unseen, media show their labels,
and the tokenizer loads and round-trips the corpus text."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import av
import jsonschema
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from entry_points import load_script
from toollmm.core.paths import DATA_DIR
from toollmm.core.tokens import PLACEHOLDER_RE, TokenContract
from toollmm.demo import media
from toollmm.demo.corpus import DemoSizes, generate_demo_corpus, validate_records
from toollmm.demo.tools import CITIES, DEMO_TOOLS, REQUESTS, WORDS, pseudo_name, run_demo_tool

MEDIA_KEY = {"image": "images", "audio": "audios", "video": "videos"}


def _load_entry():
    return load_script("code/prepare_data.py", "prepare_data")


prepare_data = _load_entry()  # the corpus's command line: code/prepare_data.py demo


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "summary.json"
    }


def _load(root: Path, split: str, task: str) -> list[dict]:
    return [json.loads(line) for line in (root / split / f"{task}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert prepare_data.main(["demo", "--output", str(out), "--small", "--seed", "0"]) == 0
    return out


def _all(root: Path):
    for split in ("train", "heldout"):
        for f in sorted((root / split).glob("*.jsonl")):
            for rec in _load(root, split, f.stem):
                yield split, f.stem, rec


def test_same_seed_writes_identical_files_and_another_seed_differs(corpus, tmp_path):
    again = tmp_path / "again"
    generate_demo_corpus(again, seed=0, small=True)
    assert _hashes(again) == _hashes(corpus)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (corpus, again))
    s1.pop("generation_s"), s2.pop("generation_s")
    assert s1 == s2

    tiny = DemoSizes(renders={m: (1, 1) for m in MEDIA_KEY}, t2x={m: 2 for m in MEDIA_KEY}, instruct=(2, 1),
                     tools=(2, 1), lm_copy=2, lm_instruct=1, lm_t2x=1, lm_tools=2)  # fmt: skip
    other = generate_demo_corpus(tmp_path / "seed1", seed=1, sizes=tiny)
    assert other["seed"] == 1
    for rel in ("media/image/train/00000.png", "media/audio/train/00000.wav", "media/video/train/00000.mp4"):
        assert (tmp_path / "seed1" / rel).read_bytes() != (corpus / rel).read_bytes(), rel


def test_records_are_schema_valid_and_each_placeholder_has_one_existing_medium(corpus):
    validator = jsonschema.Draft202012Validator(json.loads((DATA_DIR / "schema.json").read_text()))
    ids, n = set(), 0
    for split, task, rec in _all(corpus):
        assert not list(validator.iter_errors(rec)), (split, task, rec["id"])
        assert rec["id"] not in ids
        ids.add(rec["id"])
        found = [m for msg in rec["messages"] for m in PLACEHOLDER_RE.findall(msg["content"])]
        for m, key in MEDIA_KEY.items():
            assert found.count(m) == len(rec.get(key, [])), rec["id"]
            assert all((corpus / p).is_file() for p in rec.get(key, [])), rec["id"]
        assert ("eval" in rec) == (split == "heldout"), rec["id"]
        n += 1
    summary = json.loads((corpus / "summary.json").read_text())
    assert n == summary["records_total"] and 300 <= n <= 1700
    for split, tasks in summary["counts"].items():
        for task, count in tasks.items():
            assert len(_load(corpus, split, task)) == count


def test_validate_records_names_file_and_record():
    good = {
        "id": "r1",
        "source": "s",
        "messages": [{"role": "user", "content": "<image>\nhi"}],
        "images": ["a.png"],
    }
    validate_records([good], "f.jsonl")
    with pytest.raises(ValueError, match=r"f\.jsonl: record r2: 1 <image> placeholders but 0 images"):
        validate_records([{**good, "id": "r2", "images": []}], "f.jsonl")
    with pytest.raises(ValueError, match=r"f\.jsonl: record r3: schema error"):
        validate_records([{**good, "id": "r3", "colour": "red"}], "f.jsonl")


def _free_values(call: dict) -> set[tuple[str, object]]:
    """Argument values that must never repeat across splits (enums like op, unit, day may)."""
    free = {"a", "b", "value", "city", "word", "prompt"}
    return {(k, v) for k, v in call["arguments"].items() if k in free}


def test_heldout_tool_arguments_and_phrasings_never_occur_in_training(corpus):
    for tool, sets in REQUESTS.items():
        assert not set(sets["train"]) & set(sets["heldout"]), tool
    train_users, train_calls, train_values = set(), set(), set()
    train_text = []
    for split, _, rec in _all(corpus):
        if split != "train":
            continue
        for msg in rec["messages"]:
            train_text.append(msg["content"])
            if msg["role"] == "user":
                train_users.add(msg["content"])
            for c in msg.get("tool_calls", []):
                train_calls.add(json.dumps(c["function"], sort_keys=True))
                train_values |= _free_values(c["function"])
    held = _load(corpus, "heldout", "tools")
    assert {r["meta"]["tool"] for r in held} == {t["function"]["name"] for t in DEMO_TOOLS}
    joined = "\n".join(train_text)
    for rec in held:
        call = rec["messages"][1]["tool_calls"][0]["function"]
        assert rec["eval"]["reference"] == [call]
        assert rec["messages"][0]["content"] not in train_users, rec["id"]
        assert json.dumps(call, sort_keys=True) not in train_calls, rec["id"]
        assert not _free_values(call) & train_values, (rec["id"], _free_values(call) & train_values)
        for v in ("city", "word"):
            if v in call["arguments"]:
                assert call["arguments"][v] not in joined, rec["id"]


def _word_grams(template: str, n: int) -> set[tuple[str, ...]]:
    """Slot-free word n-grams of a request template ("{a}" etc. break a run of words)."""
    words = re.findall(r"\{\w+\}|[a-z0-9']+", template.lower())
    grams = (tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return {g for g in grams if not any(w.startswith("{") for w in g)}


def test_heldout_request_phrasings_share_no_four_word_phrase_with_training():
    """The varied training phrasings must not leak the held-out ones piecewise: no run of four words of a
    held-out template occurs in any training template, opener or closer (short templates have no such run; the check fires: "the image
    generator make" in a training template is caught)."""
    from toollmm.demo.tools import CLOSERS, OPENERS

    for tool, sets in REQUESTS.items():
        train = set().union(*(_word_grams(t, 4) for t in sets["train"] + OPENERS + CLOSERS))
        for held in sets["heldout"]:
            assert not _word_grams(held, 4) & train, (tool, held, _word_grams(held, 4) & train)
    leak = _word_grams("Ask the image generator make {p}.", 4)
    assert leak & _word_grams(REQUESTS["generate_image"]["heldout"][0], 4)


def test_made_up_values_spell_like_real_words_and_stage_3_training_copies_them(corpus):
    """Copying is what the held-out tool calls test: the made-up names of the copy drills must cover the
    clusters and doubled letters that held-out words have (a CV-only generator never wrote "ch" or "ff"),
    and stage 3's own training calls must copy made-up values, not only the 52 training cities."""
    rng = np.random.default_rng(0)
    names = [pseudo_name(rng, capital=bool(i % 2)) for i in range(2000)]
    held = [h.lower() for h in CITIES["heldout"] + WORDS["heldout"]]
    assert not [n for n in names if any(h in n.lower() for h in held)]
    joined = " ".join(names).lower()
    for cluster in ("ch", "ff", "mm", "wh", "sk", "oo", "nn", "ss"):
        assert cluster in joined, cluster
    assert len(set(names)) > 1500
    calls = [r["messages"][1]["tool_calls"][0]["function"] for r in _load(corpus, "train", "tools")]
    for key, known in (("city", CITIES["train"]), ("word", WORDS["train"])):
        values = [c["arguments"][key] for c in calls if key in c["arguments"]]
        made_up = [v for v in values if v not in known]
        assert len(values) >= 20 and 0.3 <= len(made_up) / len(values) <= 0.7, (
            key,
            len(made_up),
            len(values),
        )


def _contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_argument_values_are_token_for_token_copies_of_the_request(corpus):
    """A tool call copies its values from the request, so each value must be the same ids in both places,
    as the real renderer lays out a training record (config/demo.yaml's template). With the word-boundary
    mark merged into a word's first piece, an unseen word split differently after a space than after a quote
    ("▁sa|v|an|na" against "s|a|v|an|na"): the stand-in LM had to respell words it never saw, and never did."""
    from transformers import AutoTokenizer

    from toollmm.core.config import load_config
    from toollmm.data.render import Renderer

    cfg = load_config(3, [Path(__file__).parents[2] / "config" / "demo.yaml"]).config
    tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    TokenContract().add_to(tok)
    renderer = Renderer.from_config(cfg, tok)
    space = tok.convert_tokens_to_ids("\u2581")
    # "▁" is an ordinary piece: decoding and the agent's forced tool results keep the spaces
    assert space not in tok.all_special_ids and "\u2581" not in tok.get_added_vocab()
    from toollmm.agent.forcing import ForcedText

    contract_ids = TokenContract().ids(tok)
    result = (
        '{"result": 0.09, "unit": "ft"}',
        contract_ids.tool["<tool_result>"],
        contract_ids.tool["</tool_result>"],
    )
    forced = ForcedText(tok, contract_ids).wrapped(*result)
    assert tok.decode(forced) == '<tool_result>{"result": 0.09, "unit": "ft"}</tool_result>'
    call_start, call_end = (tok.convert_tokens_to_ids(t) for t in ("<tool_call>", "</tool_call>"))
    checked = 0
    for split in ("train", "heldout"):
        for rec in _load(corpus, split, "tools"):
            ids = renderer.render(rec).input_ids
            request = rec["messages"][0]["content"]
            call_ids = ids[ids.index(call_start) : ids.index(call_end)]
            req_ids = ids[: ids.index(call_start)]
            for key, value in rec["messages"][1]["tool_calls"][0]["function"]["arguments"].items():
                if not re.search(rf"(?<![\w-]){re.escape(str(value))}(?!\w)", request):
                    continue  # an enum the request words differently ("times" -> multiply)
                part = tok.encode(str(value), add_special_tokens=False)
                part = part[1:] if part[:1] == [space] else part
                assert part and _contains(call_ids, part), (split, rec["id"], key, value)
                assert _contains(req_ids, part), (
                    split,
                    rec["id"],
                    key,
                    value,
                    tok.convert_ids_to_tokens(req_ids),
                )
                checked += 1
    assert checked > 200


def test_tool_messages_are_the_backends_results_and_calls_match_the_specs(corpus):
    params = {t["function"]["name"]: t["function"]["parameters"] for t in DEMO_TOOLS}
    n = 0
    for _, _, rec in _all(corpus):
        for i, msg in enumerate(rec["messages"]):
            for c in msg.get("tool_calls", []):
                name, args = c["function"]["name"], c["function"]["arguments"]
                jsonschema.validate(args, params[name])
                result = rec["messages"][i + 1]
                assert result["role"] == "tool" and result["name"] == name
                assert json.loads(result["content"]) == run_demo_tool(name, args)
                n += 1
    assert n > 100
    assert run_demo_tool("calculator", {"a": 84, "b": 12, "op": "divide"}) == {"result": 7}
    assert run_demo_tool("unit_convert", {"value": 100, "from_unit": "celsius", "to_unit": "fahrenheit"}) == {
        "result": 212,
        "unit": "fahrenheit",
    }
    assert run_demo_tool("count_letters", {"word": "Banana", "letter": "a"}) == {"count": 3}
    with pytest.raises(ValueError, match="division by zero"):
        run_demo_tool("calculator", {"a": 1, "b": 0, "op": "divide"})
    with pytest.raises(ValueError, match="unknown demo tool 'nope'"):
        run_demo_tool("nope", {})


def test_heldout_media_are_new_renders_of_seen_attribute_values(corpus):
    for m, key in MEDIA_KEY.items():
        train, held = _load(corpus, "train", f"x2t_{m}"), _load(corpus, "heldout", f"x2t_{m}")
        train_caps = {r["messages"][-1]["content"] for r in train}
        assert {r["messages"][-1]["content"] for r in held} <= train_caps
        train_bytes = {hashlib.sha256((corpus / r[key][0]).read_bytes()).digest() for r in train}
        assert not {hashlib.sha256((corpus / r[key][0]).read_bytes()).digest() for r in held} & train_bytes
        for r in held:
            assert r["eval"]["acceptable"] == [r["messages"][-1]["content"]]
            assert r["eval"]["reference"]["attributes"] == r["meta"]["attributes"]
        t2x = _load(corpus, "heldout", f"t2x_{m}")
        assert {g["caption"] for r in t2x for g in r["messages"][-1]["generate"]} <= train_caps


def _nearest(rgb, palette: dict) -> str:
    return min(palette, key=lambda k: float(np.sum((np.asarray(palette[k], float) - rgb) ** 2)))


def test_images_show_their_colour_and_shape(corpus):
    fill_ratio = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "cross": 0.58}  # area / bounding box
    recs = _load(corpus, "train", "x2t_image") + _load(corpus, "heldout", "x2t_image")
    for rec in recs:
        img = np.asarray(Image.open(corpus / rec["images"][0]).convert("RGB"), dtype=float)
        assert img.shape == (224, 224, 3)
        mask = np.abs(img - img[0, 0]).sum(-1) > 60  # the corner is background
        ys, xs = np.nonzero(mask)
        attrs = rec["meta"]["attributes"]
        assert _nearest(img[mask].mean(0), media.COLOURS) == attrs["colour"], rec["id"]
        ratio = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert min(fill_ratio, key=lambda s: abs(fill_ratio[s] - ratio)) == attrs["shape"], rec["id"]


def test_tones_have_their_pitch_and_pulse(corpus):
    bands = {"low": 250.0, "middle": 700.0, "high": 2000.0}
    pulses_in_3s = {"steady": 0, "slow": 6, "fast": 18}
    for rec in _load(corpus, "train", "x2t_audio") + _load(corpus, "heldout", "x2t_audio"):
        wav, sr = sf.read(corpus / rec["audios"][0])
        assert sr == 16000 and 2.0 <= len(wav) / sr <= 6.0
        peak = np.fft.rfftfreq(len(wav), 1 / sr)[np.argmax(np.abs(np.fft.rfft(wav)))]
        attrs = rec["meta"]["attributes"]
        assert abs(peak - bands[attrs["pitch"]]) <= 0.12 * bands[attrs["pitch"]], (rec["id"], peak)
        rms = np.sqrt((wav[: len(wav) // 160 * 160].reshape(-1, 160) ** 2).mean(1))  # 10 ms frames
        on = rms > 0.5 * rms.max()
        onsets = int(np.sum(on[1:] & ~on[:-1]))
        assert min(pulses_in_3s, key=lambda k: abs(pulses_in_3s[k] - onsets)) == attrs["pulse"], rec["id"]


def test_videos_move_their_colour_in_their_direction(corpus):
    for rec in _load(corpus, "train", "x2t_video") + _load(corpus, "heldout", "x2t_video"):
        with av.open(str(corpus / rec["videos"][0])) as c:
            frames = [f.to_ndarray(format="rgb24").astype(float) for f in c.decode(video=0)]
        assert len(frames) == 16 and frames[0].shape == (64, 64, 3)
        centres = []
        for f in (frames[0], frames[-1]):
            ys, xs = np.nonzero(f.sum(-1) > 150)
            centres.append(np.array([xs.mean(), ys.mean()]))
        dx, dy = centres[1] - centres[0]
        moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
        attrs = rec["meta"]["attributes"]
        assert moved == attrs["direction"], rec["id"]
        mid = frames[len(frames) // 2]
        assert _nearest(mid[mid.sum(-1) > 150].mean(0), media.COLOURS) == attrs["colour"], rec["id"]


def test_lm_text_copies_attributes_from_context(corpus):
    lm = _load(corpus, "train", "lm_pretrain")
    kinds = {r["meta"]["kind"] for r in lm}
    assert kinds == {"copy", "instruct", "t2x", "tool", "repeat"}
    for r in (
        r for r in lm if r["meta"]["kind"] == "repeat"
    ):  # copy drills: the answer is the request's values
        values = r["messages"][0]["content"].split(": ", 1)[-1].removeprefix("Put ").removesuffix(" in JSON.")
        answer = r["messages"][-1]["content"]
        assert answer == values or json.loads(answer)["items"] == [
            int(v) if v.isdigit() else v for v in values.split()
        ], r["id"]
    copies = [r for r in lm if r["meta"]["kind"] == "copy"]
    assert {r["meta"]["modality"] for r in copies} == set(MEDIA_KEY)
    for r in copies:
        context = r["messages"][0]["content"].split("\n")[0].split(" caption:")[0]
        answer = r["messages"][-1]["content"].split("caption: ")[-1]
        assert all(w in answer.split() for w in context.split()), r["id"]
    assert not any(PLACEHOLDER_RE.search(m["content"]) for r in lm for m in r["messages"])


def test_tokenizer_loads_round_trips_and_takes_the_token_contract(corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    assert "<image>" not in tok.get_vocab() and "[IMG0]" not in tok.get_vocab()
    assert 300 <= len(tok) <= 1000
    texts = [m["content"] for _, _, rec in _all(corpus) for m in rec["messages"] if m["content"]]
    for t in texts:
        assert tok.decode(tok.encode(t, add_special_tokens=False)) == t
    n_before = len(tok)
    ids = TokenContract().add_to(tok)
    assert min(ids.new_ids) == n_before
    enc = tok.encode("<image>\nWhat colour is the shape?", add_special_tokens=False)
    assert enc[0] == ids.placeholder["image"] and tok.decode(enc[1:]).strip() == "What colour is the shape?"


def test_refuses_to_overwrite_a_folder_that_is_not_a_demo_corpus(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no demo corpus but other files"):
        generate_demo_corpus(tmp_path, small=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _assert_visible(res: dict, modality: str) -> None:
    attrs = {k: v for k, v in res[modality].items() if isinstance(v, dict)}
    assert set(attrs) == set(media.ATTRIBUTES[modality])
    for name, r in attrs.items():
        assert r["acc"] >= 2 * r["chance"], (modality, name, r)


def test_a_frozen_random_imagebind_separates_image_and_audio_attributes(corpus):
    from toollmm.demo.probe import audio_tensor, probe_corpus

    assert audio_tensor(corpus / "media/audio/train/00000.wav").shape == (3, 1, 128, 204)
    res = probe_corpus(corpus, modalities=("image", "audio"))
    _assert_visible(res, "image")
    _assert_visible(res, "audio")
    assert res["image"]["colour"]["acc"] >= 0.9


def test_a_frozen_random_imagebind_separates_video_attributes(corpus):
    from toollmm.demo.probe import probe_corpus, video_tensor

    assert video_tensor(corpus / "media/video/train/00000.mp4").shape == (15, 3, 2, 224, 224)
    _assert_visible(probe_corpus(corpus, modalities=("video",)), "video")


def test_instruct_answers_agree_with_the_medium(corpus):
    from toollmm.demo.text import PULSE_WORDS

    for split in ("train", "heldout"):
        for rec in _load(corpus, split, "instruct"):
            attrs = rec["meta"]["attributes"]
            words = {PULSE_WORDS.get(v, v) if k == "pulse" else v for k, v in attrs.items()}
            msgs = rec["messages"]
            for q, a in zip(msgs[0::2], msgs[1::2]):
                question, answer = q["content"].split("\n")[-1], a["content"]
                if answer == "Yes.":  # the value asked about is the medium's
                    assert any(question.endswith(f" {w}?") for w in words), (rec["id"], question)
                elif answer.startswith("No, "):
                    assert not any(question.endswith(f" {w}?") for w in words), (rec["id"], question)
                    assert any(answer.endswith(f" {w}.") for w in words), (rec["id"], answer)
                else:
                    assert any(w in answer for w in words), (rec["id"], answer)


def _user_turns(rec: dict) -> list[int]:
    return [i for i, m in enumerate(rec["messages"]) if m["role"] == "user"]


def test_multiturn_chats_mix_tools_media_input_and_generation(corpus):
    """2-3 turn chats, each turn written as its single-turn record writes it; media attached in later turns."""
    kinds, modalities, later_media = set(), set(), 0
    for split in ("train", "heldout"):
        recs = _load(corpus, split, "multiturn")
        assert recs, split
        for rec in recs:
            users = _user_turns(rec)
            assert 2 <= len(users) <= 3, rec["id"]
            assert len(set(rec["meta"]["turns"])) >= 2, rec["id"]  # never one kind repeated
            assert rec["messages"][-1]["role"] == "assistant"
            for n, (i, kind) in enumerate(zip(users, rec["meta"]["turns"])):
                kinds.add(kind)
                msgs = rec["messages"][i : (users + [len(rec["messages"])])[n + 1]]
                placeholders = PLACEHOLDER_RE.findall(msgs[0]["content"])
                if kind == "tool":
                    call = msgs[1]["tool_calls"][0]["function"]
                    assert msgs[2] == {"role": "tool", "name": call["name"],
                                       "content": json.dumps(run_demo_tool(call["name"], call["arguments"]),
                                                             sort_keys=True)}  # fmt: skip
                    assert not placeholders and len(msgs) == 4
                elif kind == "caption":
                    assert len(placeholders) == 1 and len(msgs) == 2, rec["id"]
                    modalities.add(placeholders[0])
                    later_media += n > 0
                else:
                    [gen] = msgs[1]["generate"]
                    assert gen["caption"] in msgs[0]["content"] and not placeholders
                    modalities.add(gen["modality"])
            if split == "heldout":
                ref = rec["eval"]["reference"]
                assert [t["kind"] for t in ref] == rec["meta"]["turns"]
    assert kinds == {"tool", "caption", "generate"} and modalities == {"image", "audio", "video"}
    assert later_media > 0  # a medium attached after the first turn (the chat case that broke)


def test_heldout_multiturn_chats_share_no_values_phrasings_or_media_with_training(corpus):
    train_users, train_values, train_media = set(), set(), set()
    for split, _, rec in _all(corpus):
        if split != "train":
            continue
        train_media |= {p for k in MEDIA_KEY.values() for p in rec.get(k, [])}
        for msg in rec["messages"]:
            if msg["role"] == "user":
                train_users.add(msg["content"])
            for c in msg.get("tool_calls", []):
                train_values |= _free_values(c["function"])
            train_media |= {g["media"] for g in msg.get("generate", [])}
    n_tool = 0
    for rec in _load(corpus, "heldout", "multiturn"):
        users = _user_turns(rec)
        for i, turn in zip(users, rec["eval"]["reference"]):
            if turn["kind"] == "tool":
                n_tool += 1
                assert rec["messages"][i]["content"] not in train_users, rec["id"]
                assert rec["messages"][i + 1]["tool_calls"][0]["function"] == turn["call"]
                assert not _free_values(turn["call"]) & train_values, rec["id"]
        media = {p for k in MEDIA_KEY.values() for p in rec.get(k, [])}
        media |= {g["media"] for m in rec["messages"] for g in m.get("generate", [])}
        assert media and all("/heldout/" in p for p in media) and not media & train_media, rec["id"]
    assert n_tool > 0


def test_demo_base_writes_the_demo_stand_in_and_flags_change_only_their_field(corpus, tmp_path):
    """``prepare_data.py demo-base`` (what demo.sh runs) writes ``DEMO_LLM``'s shape: before, a shape of the
    flags' own defaults replaced it, so every demo trained 4 heads while the code and README said 8."""
    from toollmm.demo.base import DEMO_LLM

    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "tie_word_embeddings")

    def shape(out):
        c = json.loads((out / "llm_init" / "config.json").read_text())
        return {k: c[k] for k in keys}

    want = {k: getattr(DEMO_LLM, k) for k in keys}
    out = tmp_path / "base"
    assert prepare_data.main(["demo-base", "--corpus", str(corpus), "--output", str(out)]) == 0
    assert shape(out) == want
    out2 = tmp_path / "base2"
    flags = ["--llm-heads", "2", "--llm-tied", "no" if DEMO_LLM.tie_word_embeddings else "yes"]
    assert prepare_data.main(["demo-base", "--corpus", str(corpus), "--output", str(out2), *flags]) == 0
    assert shape(out2) == want | {"num_attention_heads": 2, "tie_word_embeddings": not DEMO_LLM.tie_word_embeddings}


def test_request_values_keep_the_case_the_call_copies(corpus):
    """A training phrasing that starts with a value ("{w}: how many {l}?", "{c} {d}: ...") kept its first
    letter upper-cased, or lower-cased after an opener such as "Hey, ": "Banana" in the request against
    "banana" in the call (and "paris" against "Paris") taught the LM to re-case what it copies."""
    recs = _load(corpus, "train", "tools") + [
        r for r in _load(corpus, "train", "lm_pretrain") if r["meta"].get("kind") == "tool"
    ]
    starts = 0
    for r in recs:
        args = r["messages"][1]["tool_calls"][0]["function"]["arguments"]
        user = r["messages"][0]["content"]
        for k in ("city", "word", "from_unit", "to_unit"):
            if k in args:
                assert re.search(rf"\b{re.escape(str(args[k]))}\b", user), (k, args[k], user)
                starts += user.lower().startswith(str(args[k]).lower())
    assert starts >= 1  # a phrasing that starts with a value is among them
