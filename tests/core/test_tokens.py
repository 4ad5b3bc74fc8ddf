"""The special-token contract: names, order, idempotent addition, and clear failures."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from toollmm.core.config import TokenConfig
from toollmm.core.tokens import SIGNAL_RE, TOOL_TOKENS, TokenContract, TokenContractError


def test_default_counts_are_nextgpt_and_names_are_fixed():
    c = TokenContract()
    assert c.signal_tokens("image") == ["[IMG0]", "[IMG1]", "[IMG2]", "[IMG3]"]
    assert len(c.signal_tokens("video")) == 24 and c.signal_tokens("video")[-1] == "[VID23]"
    assert len(c.signal_tokens("audio")) == 8
    assert c.new_tokens[:3] == ["<image>", "<video>", "<audio>"]
    assert c.new_tokens[-4:] == list(TOOL_TOKENS)
    assert len(c.new_tokens) == 3 + 4 + 24 + 8 + 4
    assert TokenContract.from_config(TokenConfig(num_image_signal=2)).signal_tokens("image") == [
        "[IMG0]",
        "[IMG1]",
    ]
    assert SIGNAL_RE.findall("x [IMG0][VID12] y") == [("IMG", "0"), ("VID", "12")]


def test_add_is_ordered_idempotent_and_never_split(tiny_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    base = len(tok)
    c = TokenContract()
    ids = c.add_to(tok)
    assert len(tok) == base + len(c.new_tokens)
    assert ids.new_ids == list(range(base, base + len(c.new_tokens)))  # appended, in contract order
    assert ids.placeholder["image"] == base and ids.tool["</tool_result>"] == base + len(c.new_tokens) - 1
    assert c.add_to(tok) == ids and len(tok) == base + len(c.new_tokens)
    text = "USER: <image> draw [IMG0][IMG1][IMG2][IMG3]<tool_call>{}</tool_call>"
    enc = tok.encode(text, add_special_tokens=False)
    assert ids.placeholder["image"] in enc and enc.count(ids.tool["<tool_call>"]) == 1
    assert [ids.signal_modality(i) for i in enc].count("image") == 4
    assert ids.kind(ids.tool["</tool_call>"]) == ("tool", "</tool_call>")
    assert ids.kind(5) is None
    assert ids.trainable_ids == sorted(ids.group_ids("signal") + ids.group_ids("tool"))
    # saved and reloaded: same ids (a delta checked against its tokenizer, NExT-GPT #47)
    tok.save_pretrained(tmp_path / "t")
    assert c.ids(AutoTokenizer.from_pretrained(tmp_path / "t")) == ids


def test_a_tokenizer_without_the_tokens_is_refused_by_name(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    with pytest.raises(TokenContractError, match=r"<image> is not in the tokenizer.*\[IMG0\] is not in"):
        TokenContract().ids(tok)
