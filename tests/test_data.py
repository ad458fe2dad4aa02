"""Data pipeline: formats, exact label masking, truncation, bad rows, files, chatterbot, split, sampler.
(tests/test_data_sources.py: the other formats, sources, column mapping, mixtures, chat templates.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from helpers_tokenizer import make_tokenizer
from qlora.config_data import DataConfig, DatasetSpec
from qlora.data import (
    DataStats,
    chatterbot_rows,
    detect_format,
    load_source,
    make_dataloaders,
    pack,
    split_rows,
    tokenize_rows,
)
from qlora.data.batching import ResumableBatchSampler, collate
from qlora.errors import UsageError


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no hub; `tok` is conftest's too


def load_records(path: str) -> list[dict]:
    return load_source(DatasetSpec(path=path)).to_list()


def encode(rows, tok, fmt, **cfg):
    stats = DataStats()
    examples = tokenize_rows(rows, tok, fmt, DataConfig(**cfg), stats)
    return examples, stats


def trained_runs(example: dict, tok) -> list[str]:
    """Decoded text of each maximal run of labelled positions."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token  # labels are unshifted copies of the ids
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tok.decode(r) for r in runs]


CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "hello world"},
                     {"role": "assistant", "content": "I am fine"},
                     {"role": "user", "content": "What is AI?"},
                     {"role": "assistant", "content": "machines that think"}]}


def test_chat_masks_everything_but_assistant_turns(tok):
    (ex,), stats = encode([CHAT], tok, "chat")
    text = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    assert ex["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # nothing appended:
    # ChatML closes each turn with <|im_end|>, which is the EOS
    assert trained_runs(ex, tok) == ["I am fine<|im_end|>\n", "machines that think<|im_end|>\n"]
    assert stats.truncated == 0 and not stats.skipped


def test_chat_roles_outside_the_templates_are_errors_naming_the_row(tok):
    typo = {"messages": [{"role": "sytem", "content": "Be brief"}, *CHAT["messages"][1:]]}
    with pytest.raises(UsageError, match=r"row 2: 'messages' turn 0: role 'sytem' is not one of system, user"):
        encode([CHAT, typo], tok, "chat")


def test_chat_train_on_prompt_labels_every_token(tok):
    (ex,), _ = encode([CHAT], tok, "chat", train_on_prompt=True)
    assert ex["labels"] == ex["input_ids"]


def test_chat_template_without_eos_gets_a_trained_eos():
    tok = make_tokenizer("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    (ex,), _ = encode([CHAT], tok, "chat")
    assert ex["input_ids"][-1] == ex["labels"][-1] == tok.eos_token_id
    # byte-level BPE merges the generation prompt's trailing space into " machines": a token that
    # straddles the prompt / response boundary is trained (it holds response characters)
    assert trained_runs(ex, tok) == ["I am fine\n", " machines that think\n<|im_end|>"]


def test_alpaca_masks_the_prompt_and_appends_eos(tok):
    rows = [{"instruction": "What is AI?", "input": "", "output": "machines that think"},
            {"instruction": "Answer", "input": "hello world", "output": "I am fine"}]
    (a, b), _ = encode(rows, tok, "alpaca")
    assert trained_runs(a, tok) == ["machines that think<|im_end|>"]
    assert trained_runs(b, tok) == ["I am fine<|im_end|>"]
    assert "### Input:\nhello world" in tok.decode(b["input_ids"])
    assert "### Input:" not in tok.decode(a["input_ids"])  # empty input: the shorter prompt


def test_input_output_and_text(tok):
    (ex,), _ = encode([{"input": "Q: hello\n", "output": "world"}], tok, "input-output")
    assert tok.decode(ex["input_ids"]) == "Q: hello\nworld<|im_end|>"
    assert trained_runs(ex, tok) == ["world<|im_end|>"]
    (ex,), _ = encode([{"text": "hello world"}], tok, "text")
    assert ex["labels"] == ex["input_ids"] and ex["input_ids"][-1] == tok.eos_token_id


def test_truncation_is_counted_and_prompt_only_rows_are_skipped(tok):
    long = {"instruction": "hello " * 40, "output": "fine"}  # the response lies past max_length
    short = {"instruction": "hi", "output": "fine " * 40}  # truncated inside the response
    fits = {"instruction": "hi", "output": "fine"}
    limit = len(encode([fits], tok, "alpaca")[0][0]["input_ids"]) + 4
    examples, stats = encode([long, short, fits], tok, "alpaca", max_length=limit)
    assert stats.truncated == 2
    assert dict(stats.skipped) == {"no response token within max_length": 1} and stats.first_skipped == {
        "no response token within max_length": 1}  # rows count from 1
    assert [len(ex["input_ids"]) for ex in examples] == [limit, limit - 4]


def test_missing_and_empty_values_are_counted_skips_with_first_row(tok):
    rows = [{"instruction": "hi", "output": "fine"},  # good
            {"instruction": "hi"},  # missing output
            {"instruction": "hi", "output": "   "},
            {"instruction": None, "output": "fine"},
            {"instruction": "hi", "output": ""}]
    examples, stats = encode(rows, tok, "alpaca")
    assert len(examples) == 1
    assert dict(stats.skipped) == {"missing 'output'": 1, "empty 'output'": 2, "missing 'instruction'": 1}
    assert stats.first_skipped["empty 'output'"] == 3  # rows count from 1
    chats = [{"messages": []}, {"messages": [{"role": "user", "content": "hi"}]},
             {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}]
    examples, stats = encode(chats, tok, "chat")
    assert not examples and dict(stats.skipped) == {
        "empty 'messages'": 1, "'messages' has no assistant turn": 1, "missing 'messages[0].content'": 1}


@pytest.mark.parametrize("fmt, row, message", [
    ("alpaca", {"instruction": "hi", "output": 3}, "'output' is int 3, expected text"),
    ("alpaca", {"instruction": "hi", "output": "bad \ud800"}, "'output' is not valid Unicode (a lone surrogate)"),
    ("chat", {"messages": "hello"}, "'messages' is str 'hello', expected a list of turns"),
    ("chat", {"messages": ["hi", "fine"]}, "'messages' turn 0 is str 'hi', expected a {role, content} mapping"),
])
def test_wrong_types_are_errors_naming_the_row(tok, fmt, row, message):
    good = {"instruction": "hi", "output": "fine"} if fmt == "alpaca" else CHAT
    with pytest.raises(UsageError) as err:
        encode([good, row], tok, fmt)
    assert str(err.value) == f"row 2: {message}"


def test_all_rows_bad_is_a_usage_error_naming_row_and_reason(tok):
    rows = [{"instruction": "hi", "output": "fine"}] * 2 + [{"instruction": "hi", "output": ""}] * 8
    cfg = DataConfig(format="alpaca", eval_size=1, seed=1)  # held out from the usable rows
    with pytest.raises(UsageError, match=r"no usable rows \(e.g. the given rows: empty 'output', row 1\)"):
        make_dataloaders(tok, cfg, 2, 0, records=[r for r in rows if r["output"] == ""])
    train, _, stats = make_dataloaders(tok, cfg, 2, 0, records=rows)
    assert sum(stats.skipped.values()) == 8 and stats.rows == 10


def test_format_detection(tok):
    assert detect_format(["messages"], "auto") == "chat"
    assert detect_format(["conversations", "id"], "auto") == "sharegpt"
    assert detect_format(["instruction", "input", "output"], "auto") == "alpaca"
    assert detect_format(["prompt", "completion"], "auto") == "prompt-completion"
    assert detect_format(["input", "output"], "auto") == "input-output"
    assert detect_format(["text", "id"], "auto") == "text"
    with pytest.raises(UsageError, match=r"columns \['prompt', 'response'\].*alpaca: instruction, output"):
        detect_format(["prompt", "response"], "auto")
    with pytest.raises(UsageError, match=r"data.format 'alpaca'.*\['text'\]"):
        detect_format(["text"], "alpaca")
    with pytest.raises(UsageError, match="chat template"):
        tokenize_rows([CHAT], make_tokenizer(chat_template=None), "chat", DataConfig(), DataStats())


ROWS = [{"instruction": f"question {i}", "input": "", "output": f"answer {i}"} for i in range(20)]


def write_file(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    elif suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
            writer.writeheader()
            writer.writerows(ROWS)
    else:
        import datasets

        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files(tmp_path: Path, tok, suffix: str):
    path = write_file(tmp_path, suffix)
    rows = load_records(str(path))
    assert [r["output"] for r in rows] == [r["output"] for r in ROWS]
    train, evals, stats = make_dataloaders(tok, DataConfig(dataset=str(path), eval_size=4), 4, 0)
    assert (stats.train_examples, stats.eval_examples) == (16, 4) and len(train) == 4 and len(evals) == 1
    assert not stats.skipped  # CSV reads the empty input as None: treated as no input


def test_file_errors(tmp_path: Path):
    with pytest.raises(UsageError, match=r"data file .*missing.jsonl' does not exist"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(UsageError, match=r"unknown extension '.txt'; allowed: .json, .jsonl"):
        load_records(str(tmp_path / "data.txt"))
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "caf\xe9 \xff\xfe"}\n')  # Latin-1 bytes: not UTF-8
    with pytest.raises(UsageError, match=r"data file .*bad.jsonl' line 1: invalid UTF-8 \(byte 0xe9\)"):
        load_records(str(bad))
    with pytest.raises(UsageError, match="hub is offline"):
        load_records("someone/some-dataset")
    with pytest.raises(UsageError, match=r"data file .*rows.jsonl' line 2: column 'output' is a number, but "
                                         r"text in line 1"):
        (tmp_path / "rows.jsonl").write_text('{"output": "a"}\n{"output": 3}\n')
        load_records(str(tmp_path / "rows.jsonl"))


def test_chatterbot_rows_are_deterministic_chats():
    rows = chatterbot_rows()
    assert rows == chatterbot_rows()
    # chatterbot-corpus 1.3.3 English: 2,026 conversations, one of them malformed (a bare string in
    # trivia.yml, kept as an empty conversation); counted by reading the YAML files directly
    assert len(rows) == 2026
    good = [r["messages"] for r in rows if r["messages"]]
    assert len(good) == 2025
    for messages in good:
        assert len(messages) % 2 == 0  # a trailing unanswered user turn is dropped
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
    assert good[0][0]["content"] == "What is AI?"  # ai.yml comes first (sorted)


def test_chatterbot_loaders_skip_the_malformed_conversation(tok):
    train, evals, stats = make_dataloaders(tok, DataConfig(max_length=512, eval_size=25), 8, 0)
    assert dict(stats.skipped) == {"chatterbot: empty 'messages'": 1}
    assert stats.train_examples + stats.eval_examples == 2025 and stats.eval_examples == 25
    batch = next(iter(train))
    assert batch["input_ids"].shape[0] == 8


def test_split_is_deterministic_and_disjoint():
    rows = [{"text": str(i)} for i in range(100)]
    train, evals = split_rows(rows, DataConfig(eval_fraction=0.1, seed=3))
    assert (train, evals) == split_rows(rows, DataConfig(eval_fraction=0.1, seed=3))
    assert evals != split_rows(rows, DataConfig(eval_fraction=0.1, seed=4))[1]
    assert len(evals) == 10 and sorted(train + evals) == list(range(100))
    assert len(split_rows(rows, DataConfig(eval_size=7, eval_fraction=0.1))[1]) == 7
    # A hold-out that would leave under half the rows for training is scaled to a tenth, with a note.
    assert len(split_rows(rows, DataConfig(eval_size=100))[1]) == 10
    assert len(split_rows(rows, DataConfig(eval_fraction=0.6))[1]) == 10
    assert len(split_rows(rows, DataConfig(eval_size=50))[1]) == 50
    with pytest.raises(UsageError, match="leave at least one row"):
        split_rows(rows[:1], DataConfig(eval_size=1))


def drain(sampler, n: int) -> list[list[int]]:
    out = []
    while len(out) < n:
        for batch in sampler:
            out.append(batch)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("group_by_length", [False, True])
def test_sampler_resumes_exactly(group_by_length: bool):
    lengths = [(i * 37) % 50 + 1 for i in range(23)]
    make = lambda: ResumableBatchSampler(lengths, 4, seed=5, group_by_length=group_by_length)  # noqa: E731
    full = drain(make(), 30)  # 6 batches an epoch: 5 epochs
    assert sorted(i for b in full[:6] for i in b) == list(range(23))  # one epoch covers every example once
    assert full[:6] != full[6:12]  # epochs are shuffled differently
    for stop in (1, 6, 7, 17):
        first = make()
        head = drain(first, stop)
        state = first.state_dict()
        second = make()
        second.load_state_dict(state)
        assert head + drain(second, 30 - stop) == full, stop
    s = make()
    drain(s, 6)
    assert s.state_dict() == {"epoch": 1, "index": 0}


def test_group_by_length_reduces_padding():
    lengths = [(i * 37) % 200 + 1 for i in range(512)]
    padded = lambda s: sum(len(b) * max(lengths[i] for i in b) for b in s.batches(0))  # noqa: E731
    assert padded(ResumableBatchSampler(lengths, 8, group_by_length=True)) < 0.7 * padded(
        ResumableBatchSampler(lengths, 8))


def test_sampler_shards_ranks_like_accumulation():
    lengths = [1] * 22
    one = ResumableBatchSampler(lengths, 2, seed=1).batches(0)  # 11 batches
    ranks = [ResumableBatchSampler(lengths, 2, seed=1, rank=r, world_size=2).batches(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5  # the 11th batch is dropped to keep ranks in step
    assert [b for pair in zip(*ranks) for b in pair] == one[:10]


def test_collate_pads_right():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packing(tok):
    examples = [{"input_ids": list(range(k, k + n)), "labels": [-100] + list(range(k + 1, k + n))}
                for k, n in ((0, 5), (100, 7), (200, 3))]
    blocks = pack(examples, 4)
    assert [len(b["input_ids"]) for b in blocks] == [4, 4, 4, 3]
    assert sum((b["input_ids"] for b in blocks), []) == sum((e["input_ids"] for e in examples), [])
    stream = sum((e["labels"] for e in examples), [])  # each example's first label is already -100
    assert [b["labels"][1:] for b in blocks] == [stream[i + 1: i + 4] for i in range(0, len(stream), 4)]
    rows = [{"text": "hello world " * (i % 5 + 1)} for i in range(30)]
    train, _, stats = make_dataloaders(tok, DataConfig(packing=True, max_length=32, eval_size=0), 2, 0, records=rows)
    assert all(len(ex["input_ids"]) == 32 for ex in train.dataset[:-1]) and stats.truncated == 0


@pytest.mark.parametrize("name, content, words", [
    ("d.jsonl", b'{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', ["line 2", "not valid JSON"]),
    ("d.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', ["line 2", "invalid UTF-8"]),
    ("d.jsonl", b'{"text": "a"}\n\n{"text": "b\x00"}\n', ["line 3", "NUL"]),
    ("d.jsonl", b'{"text": "a"}\n[1, 2]\n', ["line 2", "JSON object"]),
    ("d.json", b'[{"text": "a"},\n {"text": }]\n', ["line 2", "not valid JSON"]),
    ("d.csv", b"input,output\nhi,there\nhow,are,you\n", ["line 3", "3 fields", "header has 2"]),
    ("d.jsonl", b"  \n", ["is empty"]),
])
def test_bad_data_files_name_the_file_and_line(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UsageError) as err:
        load_records(str(path))
    assert str(path) in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_a_folder_is_not_a_data_file(tmp_path):
    (tmp_path / "rows.jsonl").mkdir()
    with pytest.raises(UsageError, match=r"rows.jsonl'.*no data files|rows.jsonl'.*is a folder"):
        load_records(str(tmp_path / "rows.jsonl"))
