"""Preference rows through the data pipeline: formats, implicit prompts, KTO rows, counted skips,
bad rows and recipes refused with the key or row named."""

from __future__ import annotations

import pytest

from qlora.config import DataConfig, RecipeConfig
from qlora.config_preference import PreferenceConfig
from qlora.data.preference import batch_units, check_objective, make_preference_loaders
from qlora.data.rows import load_rows
from qlora.errors import UsageError
from qlora.recipe import recipe_from_dict

CFG = DataConfig(eval_size=0, max_length=48)
U, A = "user", "assistant"


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _rows(records, cfg=CFG):
    return load_rows(cfg, records)


def test_paired_strings_and_conversations(offline):
    text = _rows([{"prompt": "What is AI?", "chosen": " A science.", "rejected": " A fruit."}])
    assert text.train[0]["chosen"] == " A science." and text.train[0]["label"] == -1
    chat = _rows([{"prompt": [_turn(U, "hi")], "chosen": [_turn(A, "hello")], "rejected": [_turn(A, "go away")]}])
    row = chat.train[0]
    assert row["prompt_messages"] == [_turn(U, "hi")] and row["rejected_messages"] == [_turn(A, "go away")]
    assert row["query"] == "hi"


def test_implicit_prompt_is_the_shared_prefix(offline):
    shared = [_turn(U, "hi"), _turn(A, "hello"), _turn(U, "how are you?")]
    rows = _rows([{"chosen": shared + [_turn(A, "fine")], "rejected": shared + [_turn(A, "bad")]}])
    row = rows.train[0]
    assert row["prompt_messages"] == shared and row["chosen_messages"] == [_turn(A, "fine")]


def test_unpaired_rows_and_columns_mapping(offline):
    cfg = DataConfig(eval_size=0, columns={"prompt": "q", "completion": "a", "label": "good"})
    rows = _rows([{"q": "x?", "a": " y", "good": True}, {"q": "x?", "a": " z", "good": False}], cfg)
    assert rows.train["label"] == [1, 0]


def test_counted_skips_and_bad_rows(offline):
    rows = _rows([{"prompt": "p", "chosen": " same", "rejected": " same"},
                  {"prompt": "p", "chosen": " a", "rejected": None},
                  {"prompt": "p", "chosen": " a", "rejected": " b"}])
    assert len(rows.train) == 1
    assert {"the given rows: chosen and rejected are identical", "the given rows: missing 'rejected'"} == set(rows.skips.counts)
    with pytest.raises(UsageError, match=r"row 1: 'chosen' is int 3, expected text"):
        _rows([{"prompt": "p", "chosen": 3, "rejected": "b"}])
    with pytest.raises(UsageError, match=r"row 1: 'label' is str 'yes'"):
        _rows([{"prompt": "p", "completion": "a", "label": "yes"}])


def test_objective_must_fit_the_rows(offline):
    chat = _rows([{"messages": [_turn(U, "hi"), _turn(A, "hello")]}])
    with pytest.raises(UsageError, match=r"train.objective 'dpo' needs preference rows .*no 'rejected'"):
        check_objective("dpo", chat)
    pairs = _rows([{"prompt": "p", "chosen": " a", "rejected": " b"}])
    with pytest.raises(UsageError, match=r"train.objective 'sft' trains on supervised rows"):
        check_objective("sft", pairs)
    unpaired = _rows([{"prompt": "p", "completion": " a", "label": True}])
    with pytest.raises(UsageError, match=r"'orpo' needs paired rows"):
        check_objective("orpo", unpaired)


def test_tokens_skips_and_batches(tok, offline):
    long_prompt = "hello world " * 40
    rows = _rows([{"prompt": "What is AI?", "chosen": " A science.", "rejected": " A fruit, I think."},
                  {"prompt": "hello", "chosen": " world", "rejected": " you"},
                  {"prompt": long_prompt, "chosen": " a", "rejected": " b"}])
    train, evals, stats = make_preference_loaders(tok, CFG, "dpo", 2, 0, rows)
    assert evals is None and stats.train_examples == 2
    assert "the given rows: prompt alone fills data.max_length" in stats.skipped
    batch = next(iter(train))
    assert batch["input_ids"].shape[0] == 4 and batch_units(batch) == 2  # [chosen; rejected] rows of 2 pairs
    eos = tok.eos_token_id
    for row in range(4):  # every completion ends with the EOS, and it is a target
        labels = [t for t in batch["labels"][row].tolist() if t != -100]
        assert labels[-1] == eos
    # the prompt carries no label, and a completion's labels are exactly its tokens
    ex = train.dataset[0]
    assert tok.decode(ex["prompt_ids"]) + tok.decode(ex["chosen_ids"]) in (
        "What is AI? A science.<|im_end|>", "hello world<|im_end|>")


def test_kto_unpairs_pairs_and_needs_both_labels(tok, offline):
    rows = _rows([{"prompt": "hello", "chosen": " world", "rejected": " you"},
                  {"prompt": "What is AI?", "chosen": " A science.", "rejected": " A fruit."}])
    train, _, stats = make_preference_loaders(tok, CFG, "kto", 2, 0, rows)
    assert stats.train_examples == 4 and sorted(ex["label"] for ex in train.dataset) == [False, False, True, True]
    batch = next(iter(train))
    assert {"desirable", "kl_input_ids", "kl_labels"} <= set(batch) and batch_units(batch) == 2
    only_good = _rows([{"prompt": "p", "completion": " a", "label": True}, {"prompt": "q", "completion": " b", "label": True}])
    with pytest.raises(UsageError, match="every training row is desirable"):
        make_preference_loaders(tok, CFG, "kto", 2, 0, only_good)


@pytest.mark.parametrize("section, override, words", [
    ({"dpo": {"beta": 0}}, None, "dpo.beta: 0"),
    ({"dpo": {"loss_type": "simpoo"}}, None, "did you mean 'simpo'"),
    ({"train": {"objective": "dpo"}, "data": {"packing": True}}, None, "data.packing"),
    ({"train": {"objective": "kto", "micro_batch_size": 1}}, None, "train.micro_batch_size: 1"),
])
def test_bad_preference_recipes_name_the_key(section, override, words):
    with pytest.raises(UsageError, match=words):
        recipe_from_dict(section)


def test_uses_reference():
    assert PreferenceConfig().uses_reference("dpo") and PreferenceConfig().uses_reference("kto")
    assert not PreferenceConfig(loss_type="simpo").uses_reference("dpo")
    assert not PreferenceConfig().uses_reference("orpo")
    assert RecipeConfig().train.objective == "sft"
