"""Bring-your-own data: every format and source made on the fly (no network), `data.columns`,
weighted mixtures, `data.chat_template`, datasets' cache, and bad data failing before the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers_tokenizer import make_tokenizer
from qlora.config import DataConfig
from qlora.data import make_dataloaders
from qlora.data.rows import load_rows
from qlora.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
QA = [("What is AI?", "machines that think"), ("hello world", "I am fine"), ("how are you today?", "fine, thank you")]


pytestmark = pytest.mark.usefixtures("offline")  # conftest: no hub; `tok` is conftest's too


def jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def decoded(tok, path: str, **cfg) -> list[tuple[str, list[int]]]:
    """(full text, labels) of every training example of a data file, in data set order."""
    train, _, _ = make_dataloaders(tok, DataConfig(dataset=path, eval_size=0, **cfg), 1, 0)
    return [(tok.decode(ex["input_ids"]), ex["labels"]) for ex in train.dataset]


CHAT_ROWS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                           {"role": "assistant", "content": a}]} for q, a in QA]


@pytest.mark.parametrize("fmt, rows", [
    ("sharegpt", [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": q},
                                     {"from": "gpt", "value": a}]} for q, a in QA]),
    ("prompt-completion", [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}],
                            "completion": [{"role": "assistant", "content": a}]} for q, a in QA]),
])
def test_sharegpt_and_conversational_prompt_completion_equal_chat(tmp_path, tok, fmt, rows):
    chat = decoded(tok, jsonl(tmp_path / "chat.jsonl", CHAT_ROWS))
    for format_ in ("auto", fmt):
        assert decoded(tok, jsonl(tmp_path / "other.jsonl", rows), format=format_) == chat


def test_prompt_completion_equals_input_output_and_columns_map_names(tmp_path, tok):
    io_rows = decoded(tok, jsonl(tmp_path / "io.jsonl", [{"input": q + "\n", "output": a} for q, a in QA]))
    pc = jsonl(tmp_path / "pc.jsonl", [{"prompt": q + "\n", "completion": a} for q, a in QA])
    assert decoded(tok, pc) == io_rows
    assert "machines that think<|im_end|>" == tok.decode([t for t in io_rows[0][1] if t != -100])
    renamed = jsonl(tmp_path / "qa.jsonl", [{"question": q + "\n", "answer": a, "input": "x"} for q, a in QA])
    assert decoded(tok, renamed, columns={"input": "question", "output": "answer"}) == io_rows
    with pytest.raises(UsageError, match=r"data.columns: data file .*qa.jsonl' has no column 'reply' \(for "
                                         r"'output'\); its columns: question, answer, input"):
        decoded(tok, renamed, columns={"input": "question", "output": "reply"})
    with pytest.raises(UsageError, match=r"data.columns: 'answer' is not a column of any format; allowed: "):
        decoded(tok, renamed, columns={"answer": "answer"})


def test_text_and_alpaca_from_csv_and_parquet(tmp_path, tok):
    import datasets

    datasets.Dataset.from_list([{"text": q + " " + a} for q, a in QA]).to_parquet(str(tmp_path / "t.parquet"))
    texts = decoded(tok, str(tmp_path / "t.parquet"))
    assert [text for text, _ in texts] == [q + " " + a + "<|im_end|>" for q, a in QA]
    (tmp_path / "a.csv").write_text("instruction,input,output\n" + "".join(f'"{q}",,"{a}"\n' for q, a in QA))
    alpaca = decoded(tok, str(tmp_path / "a.csv"))
    assert all("### Instruction:\n" + q in text for (text, _), (q, _) in zip(alpaca, QA))


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk_folders(tmp_path, tok, as_dict):
    import datasets

    ds = datasets.Dataset.from_list(CHAT_ROWS)
    folder = tmp_path / "saved"
    (datasets.DatasetDict({"train": ds, "test": ds.select([0])}) if as_dict else ds).save_to_disk(str(folder))
    assert decoded(tok, str(folder)) == decoded(tok, jsonl(tmp_path / "c.jsonl", CHAT_ROWS))
    if as_dict:
        assert len(decoded(tok, str(folder), split="test")) == 1
        with pytest.raises(UsageError, match=r"has no split 'dev'; splits: train, test"):
            decoded(tok, str(folder), split="dev")


def test_a_folder_of_data_files_with_data_files_and_split(tmp_path, tok):
    folder = tmp_path / "repo"
    folder.mkdir()
    jsonl(folder / "a.jsonl", CHAT_ROWS)
    jsonl(folder / "b.jsonl", CHAT_ROWS[:1])
    assert len(decoded(tok, str(folder), data_files="b.jsonl")) == 1
    assert len(decoded(tok, str(folder), data_files=["a.jsonl", "b.jsonl"])) == 4


def test_hub_ids_pass_name_data_files_and_split(monkeypatch, tok):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return datasets.Dataset.from_list(CHAT_ROWS)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_rows(DataConfig(dataset="org/chats", name="en", data_files="x/*.parquet", split="validation",
                                eval_size=1))
    assert calls == [("org/chats", "en", {"data_files": "x/*.parquet", "split": "validation"})]
    assert len(rows.train) == 2 and len(rows.eval) == 1


def test_mixture_weights_are_repeat_factors(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(40)])
    b = jsonl(tmp_path / "b.jsonl", [{"input": f"b {i}", "output": "x"} for i in range(40)])

    def mix(seed: int, wa: float = 2.0, wb: float = 0.25):
        cfg = DataConfig(datasets=[{"path": a, "weight": wa}, {"path": b, "weight": wb}], eval_size=8, seed=seed)
        return load_rows(cfg)

    rows = mix(0)
    held = Counter(rows.eval["part"])
    per_part = Counter(rows.train["part"])
    assert sum(held.values()) == 8  # held out from both sets together, not repeated
    assert per_part[0] == 2 * (40 - held[0]) and per_part[1] == round(0.25 * (40 - held[1]))
    assert Counter(rows.train["completion"])["a 0"] in (0, 2)  # whole copies: each row twice (or held out)
    assert rows.train["completion"] == mix(0).train["completion"]  # deterministic with data.seed
    assert rows.train["completion"] != mix(1).train["completion"]
    assert rows.labels == [f"data file {a!r}", f"data file {b!r}"]
    assert Counter(mix(0, 1.0, 1.0).train["part"]) == {0: 40 - held[0], 1: 40 - held[1]}


def test_a_separate_eval_file_is_read_whole_and_not_repeated(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [{"text": f"a {i}"} for i in range(10)])
    held = jsonl(tmp_path / "held.jsonl", [{"text": f"e {i}"} for i in range(6)])
    rows = load_rows(DataConfig(datasets=[{"path": a, "weight": 3}], eval_dataset=held, max_rows=4))
    assert rows.train["completion"] == [f"a {i}" for i in range(4)] * 3
    assert rows.eval["completion"] == [f"e {i}" for i in range(6)]


def test_mixture_entries_are_checked():
    with pytest.raises(UsageError, match=r"data.datasets\[1\]: unknown key 'wieght' \(did you mean 'weight'\?\)"):
        DataConfig(datasets=[{"path": "a.jsonl"}, {"path": "b.jsonl", "wieght": 2}])
    with pytest.raises(UsageError, match=r"data.datasets\[0\].weight: 0.0 is not allowed; expected a number > 0"):
        DataConfig(datasets=[{"path": "a.jsonl", "weight": 0}])
    with pytest.raises(UsageError, match=r"data.datasets\[0\].format: 'jsonl' is not allowed"):
        DataConfig(datasets=[{"path": "a.jsonl", "format": "jsonl"}])


def test_tokenising_is_cached_by_datasets(tmp_path, tok, monkeypatch):
    import qlora.data.tokenize as tokenize

    path = jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    first = decoded(tok, path)
    calls = []
    real = tokenize.render_row
    monkeypatch.setattr(tokenize, "render_row", lambda *a: calls.append(1) or real(*a))
    assert decoded(tok, path) == first and calls == []  # read back from datasets' cache
    assert decoded(tok, path, train_on_prompt=True) != first and calls  # other settings: tokenised again


def test_num_proc_gives_the_same_examples(tmp_path, tok):
    path = jsonl(tmp_path / "c.jsonl", CHAT_ROWS * 4)
    assert decoded(tok, path, num_proc=2) == decoded(tok, path)


# ------------------------------------------------------------------------- chat templates

PLAIN = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
         "{% if add_generation_prompt %}assistant: {% endif %}")


def test_chat_template_by_name_and_by_file(tmp_path, tok):
    from qlora.hf.chat_template import CHATML, set_chat_template

    path = jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    (tmp_path / "plain.jinja").write_text(PLAIN)
    own = make_tokenizer(PLAIN)
    assert decoded(set_chat_template(own, "chatml"), path) == decoded(tok, path)  # the shipped ChatML
    assert set_chat_template(make_tokenizer(), str(tmp_path / "plain.jinja")).chat_template == PLAIN
    text, _ = decoded(set_chat_template(make_tokenizer(), str(tmp_path / "plain.jinja")), path)[0]
    assert text.startswith("system: Be brief.\nuser: What is AI?\nassistant: machines that think")
    named = make_tokenizer({"default": CHATML, "plain": PLAIN})
    assert set_chat_template(named, "plain").chat_template == PLAIN
    with pytest.raises(UsageError, match=r"data.chat_template: 'llama3' is not a template this tokenizer "
                                         r"knows; allowed: chatml, default, or a path to a .jinja file"):
        set_chat_template(make_tokenizer(), "llama3")
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}\n{{ m.content }\n")
    with pytest.raises(UsageError, match=r"broken.jinja' line 2: "):
        set_chat_template(make_tokenizer(), str(tmp_path / "broken.jinja"))
    with pytest.raises(UsageError, match=r"data.chat_template: .*missing.jinja' is not a file"):
        load_rows(DataConfig(chat_template=str(tmp_path / "missing.jinja")))  # checked before the tokenizer


def test_chat_template_is_saved_with_the_adapter_and_the_merged_model(tmp_path):
    from transformers import AutoTokenizer

    from qlora.adapters.merge import merge_adapter
    from qlora.adapters.peft_format import save_adapter
    from qlora.adapters.spec import LoraSpec
    from qlora.adapters.surgery import apply_lora
    from qlora.hf.chat_template import saved_chat_template, set_chat_template
    from qlora.hf.load import load_model
    from tiny_models import save_tiny

    base = save_tiny("llama", tmp_path / "base")
    make_tokenizer().save_pretrained(base)  # the base's own template: ChatML
    model = load_model(base, quant=None)
    apply_lora(model, LoraSpec(r=2, alpha=4))
    (tmp_path / "plain.jinja").write_text(PLAIN)
    tokenizer = set_chat_template(make_tokenizer(), str(tmp_path / "plain.jinja"))
    save_adapter(model, tmp_path / "adapter", LoraSpec(r=2, alpha=4), str(base), tokenizer=tokenizer)
    assert saved_chat_template(tmp_path / "adapter") == PLAIN
    assert AutoTokenizer.from_pretrained(tmp_path / "adapter").chat_template == PLAIN
    merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
    assert AutoTokenizer.from_pretrained(merged).chat_template == PLAIN
    assert AutoTokenizer.from_pretrained(base).chat_template != PLAIN


# ------------------------------------------------------------------------- failing fast


def test_a_bad_row_fails_before_the_model_loads(tmp_path):
    """`qlora train` on a file whose row 3 has an unknown role: exit 2 naming file and row, no
    traceback, nothing written, and torch never imported (so it fails in about a second)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS[:2]) + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "7"}]}) + "\n")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    code = ("import sys, runpy; sys.argv = ['qlora'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('qlora.cli', run_name='__main__')\n"
            "finally:\n    print('torch' in sys.modules, file=sys.stderr)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, "train", str(REPO / "recipes" / "tiny_smoke.yaml"),
                             f"data.dataset={bad}", "data.format=auto", f"output.dir={out}"],
                            capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2, result.stderr
    assert f"data file {str(bad)!r} row 3: 'messages' turn 1: role 'robot' is not one of" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.strip().endswith("False"), result.stderr
    assert not out.exists() and elapsed < 60  # the < 2 s figure is measured by hand, not asserted here
