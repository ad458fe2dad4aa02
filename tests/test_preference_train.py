"""Preference objectives end to end: the CLI on a tiny model, TRL's metric names in metrics.jsonl,
the reference variants (base, a starting adapter, precomputed), ORPO / KTO runs and refusals."""

from __future__ import annotations

import json
import math

import pytest

from qlora.recipe import recipe_from_dict
from qlora.run_dir import read_metrics
from qlora.training.loop import train
from test_train import run_cli

TRL_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}


def _recipe(out, **sections) -> dict:
    recipe = {"model": {"name_or_path": "tiny-llama", "dtype": "fp32"}, "quant": {"enabled": True},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "dtype": "fp32"},
              "data": {"dataset": "chatterbot-pairs", "max_rows": 24, "max_length": 48, "eval_size": 4, "seed": 0},
              "optim": {"name": "adamw", "lr": 1e-2}, "output": {"dir": str(out)},
              "train": {"objective": "dpo", "micro_batch_size": 2, "max_steps": 2, "device": "cpu", "threads": 1,
                        "eval_steps": 1, "gradient_checkpointing": False}}
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


def _train(out, **sections) -> tuple[dict, list[dict]]:
    summary = train(recipe_from_dict(_recipe(out, **sections)))
    return summary, [r for r in read_metrics(out) if "loss" in r]


def test_dpo_through_the_cli(tmp_path, offline):
    import yaml

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tmp_path / "run", train={"eval_every": 1})))
    result = run_cli("train", str(recipe), "--samples", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert TRL_NAMES <= set(steps[0]) and {f"eval_{n}" for n in TRL_NAMES} <= set(evals[0])
    # step 1: the fresh adapter (B = 0) is the reference, so every log-ratio is 0 and the loss is log 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval_rewards/accuracies"] == 0.0  # ties before training
    assert "reward accuracy" in result.stderr + result.stdout
    assert "held-out reward accuracy:" in result.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # `qlora eval RUN` scores the held-out pairs as the run's last evaluation did
    result = run_cli("eval", str(tmp_path / "run"), "--json", str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["eval_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert again["eval_rewards/accuracies"] == evals[-1]["eval_rewards/accuracies"]
    assert "reward accuracy" in result.stdout


def test_precomputed_reference_gives_the_same_run(tmp_path, offline):
    _, live = _train(tmp_path / "live")
    _, cached = _train(tmp_path / "cached", dpo={"precompute_ref": True})
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in live], rel=1e-5)
    assert [r["rewards/margins"] for r in cached] == pytest.approx([r["rewards/margins"] for r in live], rel=1e-4, abs=1e-6)


def test_dpo_from_an_sft_adapter_keeps_it_as_the_reference(tmp_path, offline):
    sft, _ = _train(tmp_path / "sft", data={"dataset": "chatterbot"}, train={"objective": "sft"})
    summary, steps = _train(tmp_path / "dpo", model={"adapter": sft["adapter"]})
    # the policy starts as the SFT adapter and the reference is its frozen copy: loss log 2 at step 1,
    # then the policy moves and the reference does not
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[1]["rewards/margins"] != 0.0
    assert summary["eval_before"]["eval_rewards/margins"] == 0.0


@pytest.mark.parametrize("objective, extra", [("orpo", {"nll_loss", "log_odds_ratio"}), ("kto", {"kl"})])
def test_orpo_and_kto_runs_log_their_metrics(tmp_path, offline, objective, extra):
    summary, steps = _train(tmp_path / objective, train={"objective": objective})
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert extra <= set(steps[-1]) and "rewards/chosen" in steps[-1]
    assert "eval_rewards/chosen" in summary["eval_after"]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_preference_input_exits_2_and_writes_nothing(tmp_path, offline):
    import yaml

    cases = {
        "rejected": (_recipe(tmp_path / "a", data={"dataset": _jsonl(tmp_path / "sft.jsonl", [
            {"prompt": "p", "completion": "c"}] * 4), "eval_size": 0}), "no 'rejected'"),
        "kto": (_recipe(tmp_path / "b", train={"objective": "kto"}, data={"dataset": _jsonl(
            tmp_path / "good.jsonl", [{"prompt": "p", "completion": f"c{i}", "label": True} for i in range(4)]),
            "eval_size": 0}), "every training row is desirable"),
    }
    other = tmp_path / "other-base-adapter"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                           "target_modules": "all-linear",
                                                           "base_model_name_or_path": "some/other-model"}))
    cases["adapter"] = (_recipe(tmp_path / "c", model={"adapter": str(other)}), "model.adapter: .* adapts the base")
    for name, (recipe, words) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        result = run_cli("train", str(path))
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
        import re

        assert re.search(words, result.stderr), (name, result.stderr[-500:])
        assert not (tmp_path / recipe["output"]["dir"]).exists() or not any(
            (tmp_path / recipe["output"]["dir"]).iterdir())


def test_plot_draws_the_reward_panel(tmp_path):
    from qlora.reports.plot import loss_figure

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 0.7 - 0.01 * s, "lr": 1e-4, "tokens": 100 * s, "rewards/accuracies": 0.5 + 0.1 * s,
                "rewards/margins": 0.01 * s} for s in (1, 2, 3)]
    records.append({"step": 3, "eval_loss": 0.6, "eval_rewards/accuracies": 0.8, "eval_rewards/margins": 0.05})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fig = loss_figure(run)
    panel = fig.axes[3]
    assert panel.get_title() == "rewards (chosen vs rejected)"
    assert [line.get_label() for line in panel.get_lines()][:4] == ["train accuracy", "train margin", "eval accuracy",
                                                                    "eval margin"]
