"""AdaLoRA (qlora/nn/adalora.py, qlora/adapters/adalora.py): the layer, PEFT's gradients and rank
allocation step for step, the saved rank pattern read by PEFT, our LoRA-equivalent reading, a run
with its exact resume, and the recipe errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from qlora.adapters.adalora import RankAllocator, budget, lora_equivalent
from qlora.adapters.peft_format import adapter_state_dict, load_adapter, read_adapter_weights, save_adapter
from qlora.adapters.spec import AdaLoraSchedule, LoraSpec, read_spec
from qlora.adapters.surgery import apply_lora
from qlora.hf.load import load_model
from qlora.nn.adalora import AdaLoRALinear
from qlora.quant.format import QuantFormat
from test_adapter import _offline, base  # noqa: F401  (fixtures: offline hub, a tiny llama folder)
from test_train import TINY, home, run_cli  # noqa: F401  (fixture: a private QLORA_HOME)
from tiny_models import tokens

TARGETS = ("q_proj", "v_proj", "up_proj")
SCHEDULE = AdaLoraSchedule(target_r=2, tinit=1, tfinal=2, delta_t=1, orth_reg_weight=0.5, total_step=8)
SPEC = LoraSpec(r=6, alpha=8, targets=TARGETS, dtype="fp32", adalora=SCHEDULE)


def randomise_e(model: nn.Module, seed: int = 4) -> None:
    """Non-zero singular values (E starts at 0), so the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_E"):
                p.copy_(torch.randn(p.shape, generator=g))


def test_fresh_layer_equals_its_base_and_delta_is_the_svd_form():
    torch.manual_seed(0)
    linear = nn.Linear(32, 24)
    layer = AdaLoRALinear(linear, r=5, alpha=10, dtype=torch.float32)
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), linear(x))
    randomise_e(layer)
    a, e, b = layer.lora_A.weight, layer.lora_E, layer.lora_B.weight
    expected = 10 / (5 + 1e-5) * b @ (a * e)
    torch.testing.assert_close(layer.delta_weight(), expected)
    torch.testing.assert_close(layer(x), linear(x) + x @ expected.T)
    assert set(layer.trainable_parameters()) == {"lora_A", "lora_E", "lora_B"}


def test_budget_schedule_is_cubic():
    s = AdaLoraSchedule(target_r=2, tinit=2, tfinal=3, delta_t=2, total_step=15)
    initial, target = 6 * 4, 2 * 4
    assert budget(s, initial, target, 2) == (initial, False)
    assert budget(s, initial, target, 13) == (target, True)
    kept, mask = budget(s, initial, target, 6)
    assert kept == int(16 * (1 - 4 / 10) ** 3 + 8) and mask
    assert not budget(s, initial, target, 7)[1]  # masks every delta_t steps


def _pair(base: Path, tmp_path: Path):
    """Our AdaLoRA model and PEFT's on the same fp32 base, with the same random A, E, B."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    ours = load_model(base, quant=None, dtype=torch.float32)
    apply_lora(ours, SPEC)
    randomise_e(ours)
    save_adapter(ours, tmp_path / "a", SPEC, str(base), prune_ranks=False)
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a", is_trainable=True)
    return ours, theirs


def _peer_params(theirs) -> dict[str, nn.Parameter]:
    return {n.replace("base_model.model.", "").replace(".default", ""): p
            for n, p in theirs.named_parameters() if p.requires_grad}


def _our_params(ours) -> dict[str, nn.Parameter]:
    return {n.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B"): p
            for n, p in ours.named_parameters() if p.requires_grad}


def test_loss_penalty_and_gradients_equal_peft(base, tmp_path):
    """fp32: our loss + orthogonality penalty and every A, E, B gradient equal PEFT's AdaLoRA."""
    ours, theirs = _pair(base, tmp_path)
    allocator = RankAllocator(ours, SCHEDULE)
    ids = tokens(2, 12)
    loss_ours = ours(input_ids=ids, labels=ids).loss + allocator.penalty()
    loss_theirs = theirs(input_ids=ids, labels=ids).loss  # PEFT adds its penalty to the model's loss
    assert allocator.penalty() > 0.1  # random A, B are far from orthogonal: the penalty matters
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-6)
    loss_ours.backward()
    loss_theirs.backward()
    mine, peers = _our_params(ours), _peer_params(theirs)
    assert mine.keys() == peers.keys() and len(mine) == 3 * len(TARGETS) * 2
    for name in mine:
        torch.testing.assert_close(mine[name].grad, peers[name].grad, rtol=1e-4, atol=1e-6)


def test_rank_allocation_equals_peft_step_for_step(base, tmp_path):
    """Same SGD steps on both: after every step our masks equal PEFT's, through the final pattern."""
    ours, theirs = _pair(base, tmp_path)
    allocator = RankAllocator(ours, SCHEDULE)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    masked_any = False
    for step in range(1, SCHEDULE.total_step + 1):
        ids = tokens(2, 12, seed=step)
        (ours(input_ids=ids, labels=ids).loss + allocator.penalty()).backward()
        theirs(input_ids=ids, labels=ids).loss.backward()
        opt_ours.step()
        opt_theirs.step()
        allocator.after_step(step)
        theirs.base_model.update_and_allocate(step)
        opt_ours.zero_grad()
        opt_theirs.zero_grad()
        peers = _peer_params(theirs)
        for name, p in _our_params(ours).items():
            if name.endswith("lora_E"):
                assert torch.equal(p == 0, peers[name] == 0), (step, name)
                masked_any |= bool((p == 0).any())
    pattern = theirs.peft_config["default"].rank_pattern
    kept = sum(sum(v) for v in pattern.values())
    assert masked_any and kept <= SCHEDULE.target_r * len(pattern)
    ours_pattern = {f"{fqn}.lora_E": layer.rank_mask.tolist() for fqn, layer in allocator.layers.items()}
    assert ours_pattern == {k.replace(".default", ""): v for k, v in pattern.items()}


def _masked_model(base: Path, quant: QuantFormat | None, dtype: torch.dtype = torch.bfloat16):
    torch.manual_seed(0)
    model = load_model(base, quant=quant, dtype=dtype)
    spec = LoraSpec(r=6, alpha=8, targets=TARGETS, adalora=SCHEDULE, dtype="fp32" if dtype == torch.float32 else "bf16")
    apply_lora(model, spec)
    randomise_e(model)
    g = torch.Generator().manual_seed(7)
    for layer in model.modules():
        if isinstance(layer, AdaLoRALinear):
            layer.apply_rank_mask(torch.rand(layer.r, generator=g) < 0.5)
    return model, spec


def test_saved_pattern_loads_in_peft_with_our_logits(base, tmp_path):
    """The final adapter keeps only the kept triplets; PEFT and our LoRA-equivalent reader both
    compute what the trained model computes."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model, spec = _masked_model(base, None, torch.float32)
    save_adapter(model, tmp_path / "a", spec, str(base))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 6 and config["total_step"] == 8
    layers = {fqn: m for fqn, m in model.named_modules() if isinstance(m, AdaLoRALinear)}
    assert config["rank_pattern"] == {f"{f}.lora_E": m.rank_mask.tolist() for f, m in layers.items()}
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    fqn, layer = next(iter(layers.items()))
    assert saved[f"base_model.model.{fqn}.lora_A"].shape[0] == int(layer.rank_mask.sum())

    with torch.no_grad():
        ours = model(tokens()).logits.float()
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        before = plain(tokens()).logits.float()
        theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a")(tokens()).logits.float()
        reread = load_model(base, quant=None, dtype=torch.float32)
        load_adapter(reread, tmp_path / "a", dtype="fp32")
        mine = reread(tokens()).logits.float()
    assert (ours - before).abs().max() > 0.02  # the adapters matter
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mine, ours, rtol=1e-5, atol=1e-5)


def test_lora_equivalent_gives_the_same_update(base, tmp_path):
    model, spec = _masked_model(base, QuantFormat())
    save_adapter(model, tmp_path / "a", spec, str(base))
    lora_spec, config = read_spec(tmp_path / "a")
    assert lora_spec.adalora is None and lora_spec.r == 6
    pairs = read_adapter_weights(tmp_path / "a")
    for fqn, layer in model.named_modules():
        if isinstance(layer, AdaLoRALinear):
            a, b = pairs[f"base_model.model.{fqn}.lora_A.weight"], pairs[f"base_model.model.{fqn}.lora_B.weight"]
            torch.testing.assert_close(lora_spec.scaling * b @ a, layer.delta_weight(), rtol=1e-6, atol=1e-7)
    assert lora_equivalent(adapter_state_dict(model), {**config, "rank_pattern": None}).keys() == pairs.keys()


def test_run_resumes_exactly_and_reads_back(home, tmp_path):  # noqa: F811
    """A tiny AdaLoRA run: ranks fall to the target, a run resumed from its step-3 checkpoint ends
    with the same adapter bytes as the uninterrupted one (the scores are checkpointed), and
    `qlora eval` reproduces its final eval through the LoRA-equivalent reader."""
    import shutil

    args = ["lora.use_adalora=true", "lora.r=4", "lora.target_r=2", "lora.tinit=1", "lora.tfinal=1",
            "train.max_steps=6", "train.save_every=3", "train.eval_every=0", "--samples", "0"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    result = run_cli("train", str(TINY), f"output.dir={whole}", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(whole, parts)
    shutil.rmtree(parts / "checkpoints" / "step-000006")
    shutil.rmtree(parts / "adapter")
    resumed = run_cli("train", str(TINY), f"output.dir={parts}", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (whole / "adapter" / name).read_bytes() == (parts / "adapter" / name).read_bytes(), name
    config = json.loads((whole / "adapter" / "adapter_config.json").read_text())
    kept = [sum(v) for v in config["rank_pattern"].values()]
    assert sum(kept) <= 2 * len(kept)
    records = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    ranks = [r["adalora_rank"] for r in records if "adalora_rank" in r]
    assert ranks[0] == 4 * len(kept) and ranks[-1] == sum(kept)
    after = json.loads((whole / "summary.json").read_text())["eval_after"]["eval_loss"]
    measured = run_cli("eval", str(whole), "--json", str(tmp_path / "e.json"))
    assert measured.returncode == 0, measured.stderr[-3000:]
    assert json.loads((tmp_path / "e.json").read_text())["eval_loss"] == pytest.approx(after, rel=1e-3)


@pytest.mark.parametrize("override, key", [
    (["lora.target_r=32"], "lora.target_r"),
    (["lora.tinit=3", "lora.tfinal=3", "train.max_steps=5"], "lora.tfinal"),
    (["lora.use_dora=true"], "lora.use_dora"),
    (["lora.init=pissa"], "lora.init"),
])
def test_bad_adalora_settings_exit_2(tmp_path, override, key):
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_smoke.yaml"
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "train", str(recipe), f"output.dir={tmp_path / 'x'}",
                          "lora.use_adalora=true", *override], capture_output=True, text=True)
    assert out.returncode == 2 and key in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "x").exists()


def test_weights_put_back_after_later_masking_save_their_own_pattern(base, tmp_path):
    """keep_best's path: an earlier adapter (saved whole) loaded back after the mask moved on is
    saved with the triplets its own E holds, so the final adapter computes the earlier model."""
    from qlora.adapters.peft_format import load_adapter_weights

    model, spec = _masked_model(base, None, torch.float32)
    save_adapter(model, tmp_path / "best", spec, str(base), prune_ranks=False)
    with torch.no_grad():
        earlier = model(tokens()).logits
    for layer in model.modules():
        if isinstance(layer, AdaLoRALinear):
            layer.apply_rank_mask(torch.zeros(layer.r, dtype=torch.bool))  # later: everything masked
    load_adapter_weights(model, read_adapter_weights(tmp_path / "best", as_lora=False), tmp_path / "best")
    save_adapter(model, tmp_path / "final", spec, str(base))
    reread = load_model(base, quant=None, dtype=torch.float32)
    load_adapter(reread, tmp_path / "final", dtype="fp32")
    with torch.no_grad():
        torch.testing.assert_close(reread(tokens()).logits, earlier, rtol=1e-5, atol=1e-5)


def test_hot_swap_and_combine_read_adalora_as_lora(base, tmp_path):
    """AdapterSet (hot swap) serves a saved AdaLoRA adapter with the trained model's logits, and
    `combine` reads it as LoRA pairs of rank init_r."""
    from qlora.adapters.combine import read_adapter
    from qlora.adapters.multi import AdapterSet

    model, spec = _masked_model(base, None, torch.float32)
    save_adapter(model, tmp_path / "a", spec, str(base))
    with torch.no_grad():
        trained = model(tokens()).logits
    served = load_model(base, quant=None, dtype=torch.float32)
    adapters = AdapterSet(served, "fp32")
    adapters.load_adapter(tmp_path / "a", "ada")
    adapters.set_adapter("ada")
    with torch.no_grad():
        torch.testing.assert_close(served(tokens()).logits, trained, rtol=1e-5, atol=1e-5)
    pairs = read_adapter(tmp_path / "a").pairs
    assert len(pairs) == 2 * len(TARGETS) and all(a.shape[0] == 6 for a, _ in pairs.values())
