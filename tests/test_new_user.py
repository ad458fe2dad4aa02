"""What a new user meets first: their own rows, the files of a run, merged folders, the prompts.

One tiny run on a user's input-output file (60 rows, the recipe's format: auto and its hold-out of
8 scaled to this file) through the real CLI; its folders are then merged, quantised, evaluated and
asked to generate as a user would.
"""

from __future__ import annotations

import json
import re

import pytest

from qlora.data.prompt_style import read_style, style_of_rows
from test_train import TINY, home, run_cli  # noqa: F401  (home: a module fixture)

ROWS = [{"input": f"What is {a} plus {b}? ", "output": f"{a + b}"} for a in range(6) for b in range(10)]


@pytest.fixture(scope="module")
def io_run(home, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("io")
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = root / "run"
    result = run_cli("train", str(TINY), f"data.dataset={data}", "data.max_rows=null", "data.eval_size=64",
                     f"output.dir={out}", "train.keep_best=eval_loss", "--samples", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_a_hold_out_larger_than_the_data_is_scaled_down_with_a_note(io_run):
    out, result = io_run
    assert "data.eval_size=64 would hold out 64 of the 60 usable rows; holding out 6" in result.stderr
    assert "eval 6 examples" in result.stdout


def test_every_adapter_folder_has_the_tokenizer_and_the_prompt_style(io_run):
    from transformers import AutoTokenizer

    out, _ = io_run
    folders = [out / "adapter", out / "best", *sorted((out / "checkpoints").glob("step-*/adapter"))]
    assert len(folders) == 4
    for folder in folders:
        assert AutoTokenizer.from_pretrained(folder).eos_token == "<|im_end|>", folder
        assert read_style(folder) == "raw", folder  # input-output rows train as raw text


def test_samples_are_held_out_prompts_with_distinct_references_rendered_raw(io_run):
    out, result = io_run
    samples = json.loads((out / "summary.json").read_text())["samples"]
    assert len(samples) == 2 and len({s["reference"] for s in samples}) == 2
    for s in samples:
        assert {"input": s["prompt"], "output": s["reference"]} in ROWS  # a held-out row, its own answer
        assert f"reference (held-out row): {s['reference']}" in result.stdout


def test_generate_renders_prompts_as_the_run_was_trained(io_run, tok):
    from qlora.inference.generate import render_prompt

    out, _ = io_run
    result = run_cli("generate", str(out), "--max-new-tokens", "1", stdin="hi\n/reset\n/bogus\n\n")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"(4-bit nf4); adapter: adapter={out / 'adapter'}" in result.stderr and "prompts as raw" in result.stderr
    assert "history cleared" in result.stderr  # chat commands are answered, never sent to the model
    assert "unknown command /bogus; commands: /reset" in result.stderr
    messages = [{"role": "user", "content": "What is 1 plus 2? "}]
    assert render_prompt(tok, messages, "raw") == ("What is 1 plus 2? ", False)
    assert render_prompt(tok, messages, "chat")[0].endswith("<|im_start|>assistant\n")
    assert render_prompt(tok, messages, "alpaca")[0].endswith("### Instruction:\nWhat is 1 plus 2? \n\n### Response:\n")


def test_style_follows_the_format():
    from qlora.config import DataConfig
    from qlora.data.rows import load_rows

    cfg = DataConfig(dataset="x", eval_size=0)
    rows = {"raw": [{"input": "a", "output": "b"}], "alpaca": [{"instruction": "a", "output": "b"}],
            "chat": [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]}
    assert {style: style_of_rows(load_rows(cfg, records)) for style, records in rows.items()} == \
        {"raw": "raw", "alpaca": "alpaca", "chat": "chat"}


def loss_of(output: str) -> float:
    return float(re.search(r"loss (\d+\.\d+)", output).group(1))


def test_a_merged_folder_evaluates_as_its_run_on_the_same_rows(io_run, tmp_path):
    out, _ = io_run
    merged, quantised = tmp_path / "merged", tmp_path / "merged-4bit"
    assert run_cli("merge", str(out), str(merged)).returncode == 0  # a run folder: its adapter/
    assert read_style(merged) == "raw" and (merged / "recipe.yaml").is_file()
    assert run_cli("quantize", str(merged), str(quantised)).returncode == 0
    assert read_style(quantised) == "raw" and (quantised / "recipe.yaml").is_file()
    summary = json.loads((out / "summary.json").read_text())  # the run's own evaluations
    run, base = summary["eval_after"], summary["eval_before"]
    as_merged, as_4bit = run_cli("eval", str(merged)), run_cli("eval", str(quantised))
    for result in (as_merged, as_4bit):
        assert result.returncode == 0, result.stderr[-2000:]
        assert "scoring the eval split" in result.stderr and "data.eval_size=64" in result.stderr
        assert f"(eval, {run['eval_tokens']} tokens)" in result.stdout  # the run's held-out rows
        assert "eval: 2/2 batches" in result.stderr  # progress while it works (stderr is no terminal here)
    assert f"loaded {merged} (16-bit); adapter: none; data settings from {merged / 'recipe.yaml'}" in as_merged.stderr
    assert f"loaded {quantised} (4-bit nf4); adapter: none" in as_4bit.stderr
    # The merged weights are the dequantised base plus the update, rounded once to bf16: within
    # 0.01 of the run (0.0005 on the tiny chat run), and much closer to it than the base is.
    gap = abs(loss_of(as_merged.stdout) - run["eval_loss"])
    assert gap < 0.01 and abs(base["eval_loss"] - run["eval_loss"]) > 2 * gap


def test_a_pinned_format_that_does_not_fit_suggests_the_one_that_does(tmp_path):
    data = tmp_path / "share.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                  {"from": "gpt", "value": "hello"}]}) + "\n")
    result = run_cli("train", str(TINY), f"data.dataset={data}", "data.format=chat", f"output.dir={tmp_path / 'r'}")
    assert result.returncode == 2 and "did you mean data.format=sharegpt" in result.stderr
    assert not (tmp_path / "r").exists()


def test_sample_prompts_prefer_unseen_questions_with_distinct_references():
    from qlora.config import DataConfig
    from qlora.data.rows import load_rows
    from qlora.data.samples import sample_prompts

    def chat(q, a):
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    train = [chat("Are you human", "I am a human."), chat("Who are you", "I am a human.")]
    held = [chat("Who are you", "I am a human."), chat("What are you", "I am a human."),
            chat("what are you ", "A bot."), chat("Can you move", "I can upload a copy of myself."),
            chat("Do you eat", "I am a human.")]
    rows = load_rows(DataConfig(dataset="x"), train, eval_records=held)
    assert sample_prompts(rows, 3) == [  # "Who are you" is asked in training: last; repeats dropped
        {"prompt": "What are you", "reference": "I am a human."},
        {"prompt": "Can you move", "reference": "I can upload a copy of myself."}]
    assert sample_prompts(rows, 0) == []


def test_readme_says_how_to_reach_the_command_and_has_no_empty_code_block():
    import tomllib
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    readme = (repo / "README.md").read_text()
    two_commands = readme.split("## Two commands", 1)[1].split("##", 1)[0]
    assert "source .venv/bin/activate" in two_commands and ".venv/bin/qlora" in two_commands
    assert tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]["qlora"] == "qlora.cli:main"
    assert not re.search(r"```\w*\n```", readme)  # no empty code block
    assert "/quant-accuracy/" in (repo / ".gitignore").read_text().split()


def test_the_data_summary_is_printed_once(tok, caplog):
    """The loaders no longer warn a `data:` line of their own; train prints its summary once."""
    import logging

    from qlora.config import DataConfig
    from qlora.data.loaders import make_dataloaders

    records = [{"input": f"q{i}", "output": f"a{i}"} for i in range(8)] + [{"input": "q", "output": ""}]
    with caplog.at_level(logging.WARNING, logger="qlora"):
        _, _, stats = make_dataloaders(tok, DataConfig(dataset="x", eval_size=2), 2, 0, records=records)
    assert sum(stats.skipped.values()) == 1
    assert not [r for r in caplog.records if r.getMessage().startswith("data:")]
