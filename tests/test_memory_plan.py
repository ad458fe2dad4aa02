"""Tests for the memory planner (`qlora.memory`, `qlora memory`).

Oracles: published parameter counts, transformers' own modules (built on `meta`), bitsandbytes'
quantiser and 8-bit optimiser for byte sizes, peft for LoRA counts, and autograd's saved-tensor hooks
for activations.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from qlora.cli import main  # noqa: E402
from qlora.errors import UsageError  # noqa: E402
from qlora.memory import (  # noqa: E402
    BUILTIN_MODELS,
    GIB,
    LINEAR_NAMES,
    PlanSettings,
    plan_memory,
    quant_bits_per_param,
    quantised_tensor_bytes,
    model_shape,
    shape_from_config,
)
from qlora.memory.plan import activation_bytes, optimizer_state_bytes  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)

# Exact counts are `model.num_parameters()` of the published checkpoints (HF safetensors metadata shown
# on each model page, e.g. "8.03B params"); `published` is the rounded figure from the named source,
# written with the digits the source gives (they may truncate rather than round: one unit of slack).
PUBLISHED = [
    ("llama-7b", 6_738_415_616, "6.7e9", "LLaMA paper (Touvron et al. 2023) Table 2: 6.7B"),
    ("llama-13b", 13_015_864_320, "13.0e9", "LLaMA paper Table 2: 13.0B"),
    ("llama-33b", 32_528_943_616, "32.5e9", "LLaMA paper Table 2: 32.5B"),
    ("llama-65b", 65_285_660_672, "65.2e9", "LLaMA paper Table 2: 65.2B"),
    ("llama3-8b", 8_030_261_248, "8.03e9", "meta-llama/Meta-Llama-3-8B page: 8.03B params"),
    ("llama3-70b", 70_553_706_496, "70.6e9", "meta-llama/Meta-Llama-3-70B page: 70.6B params"),
    ("mistral-7b", 7_241_732_096, "7.24e9", "mistralai/Mistral-7B-v0.1 page: 7.24B params"),
    ("qwen2.5-0.5b", 494_032_768, "0.49e9", "Qwen2.5-0.5B model card: 0.49B"),
    ("qwen2.5-1.5b", 1_543_714_304, "1.54e9", "Qwen2.5-1.5B model card: 1.54B"),
    ("qwen2.5-3b", 3_085_938_688, "3.09e9", "Qwen2.5-3B model card: 3.09B"),
    ("qwen2.5-7b", 7_615_616_512, "7.61e9", "Qwen2.5-7B model card: 7.61B"),
    ("qwen2.5-14b", 14_770_033_664, "14.7e9", "Qwen2.5-14B model card: 14.7B"),
    ("qwen2.5-32b", 32_763_876_352, "32.8e9", "Qwen/Qwen2.5-32B page: 32.8B params"),
    ("qwen2.5-72b", 72_706_203_648, "72.7e9", "Qwen2.5-72B model card: 72.7B"),
    ("smollm2-135m", 134_515_008, "134.5e6", "project DESIGN notes / HuggingFaceTB/SmolLM2-135M: 134.5M"),
]


# ----------------------------------------------------------------------------------------------
# Model shapes


@pytest.mark.parametrize("name,exact,published,source", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_builtin_parameter_counts_match_published(name, exact, published, source):
    count = BUILTIN_MODELS[name].num_parameters()
    assert count == exact
    mantissa, exponent = published.split("e")
    decimals = len(mantissa.partition(".")[2])
    unit = 10 ** (int(exponent) - decimals)  # one unit in the last published digit
    assert abs(count - float(published)) < unit, source


DENSE = [name for name, shape in BUILTIN_MODELS.items() if shape.moe is None]  # MoE: tests/test_memory_moe.py


def test_every_builtin_is_tested():
    assert {p[0] for p in PUBLISHED} == set(DENSE)


@pytest.mark.parametrize("name", DENSE)
def test_builtin_shapes_match_transformers_modules(name):
    """One full-width layer built by transformers on `meta`: same parameter count as ours."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dataclasses.replace(BUILTIN_MODELS[name], num_hidden_layers=1)
    fields = dict(hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
                  num_hidden_layers=1, num_attention_heads=shape.num_attention_heads,
                  num_key_value_heads=shape.num_key_value_heads, vocab_size=shape.vocab_size,
                  tie_word_embeddings=shape.tie_word_embeddings)
    qwen = name.startswith("qwen")
    config = (Qwen2Config if qwen else LlamaConfig)(**fields)
    with torch.device("meta"):
        model = (Qwen2ForCausalLM if qwen else LlamaForCausalLM)(config)
    assert model.num_parameters() == shape.num_parameters()
    linears = {n.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
               for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == shape.linear_shapes()


def test_config_json_path_and_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    from_file = model_shape(str(tmp_path / "config.json"))
    from_folder = model_shape(str(tmp_path))
    assert from_file.num_parameters() == from_folder.num_parameters() == shape_from_config(TINY).num_parameters()
    assert plan_memory(TINY, PlanSettings(lora_r=8)).total_bytes == plan_memory(from_file, PlanSettings(lora_r=8)).total_bytes


def test_config_missing_field_names_it():
    bad = {k: v for k, v in TINY.items() if k != "intermediate_size"}
    with pytest.raises(UsageError, match="intermediate_size"):
        shape_from_config(bad)
    with pytest.raises(UsageError, match="hidden_size"):
        shape_from_config({**TINY, "hidden_size": 0})


# ----------------------------------------------------------------------------------------------
# 4-bit weights


def _tiny_llama(**overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


@pytest.mark.parametrize("quant_type,blocksize,double_quant",
                         [("nf4", 64, True), ("nf4", 64, False), ("fp4", 128, True), ("nf4", 256, True)])
def test_4bit_bytes_match_bitsandbytes(quant_type, blocksize, double_quant):
    """Our per-tensor formula against bnb's quantiser; the whole plan item against the model's sum."""
    import torch
    import bitsandbytes.functional as bnbf

    model = _tiny_llama()
    total = 0
    for module in model.model.layers.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        w = module.weight.detach().to(torch.bfloat16)
        packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                           compress_statistics=double_quant)
        tensors = state.as_dict(packed=True)
        tensors.pop(f"quant_state.bitsandbytes__{quant_type}")  # JSON metadata, not device memory
        # the nested offset is an fp32 scalar tensor in memory (its JSON copy was just dropped)
        offset = state.offset.nbytes if double_quant else 0
        measured = packed.nbytes + sum(t.nbytes for t in tensors.values()) + offset
        assert measured == quantised_tensor_bytes(w.numel(), blocksize, double_quant)
        total += measured
    settings = PlanSettings(lora_r=8, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    assert plan_memory(TINY, settings).breakdown["weights_4bit"] == total


def test_nf4_double_quant_bits_per_param():
    # QLoRA paper section 3: 8/64 + 32/(64*256) = 0.127 bits of constants per parameter
    assert round(quant_bits_per_param(64, True), 3) == 4.127
    assert quant_bits_per_param(64, False) == 4.5  # fp32 absmax per 64: 32/64
    n = 8192 * 22016  # LLaMA-65B MLP weight
    assert round(8 * quantised_tensor_bytes(n, 64, True) / n, 3) == 4.127
    plan = plan_memory(BUILTIN_MODELS["llama-65b"], PlanSettings())
    assert round(8 * plan.breakdown["weights_4bit"] / plan.details["quantised_parameters"], 3) == 4.127


# ----------------------------------------------------------------------------------------------
# LoRA and optimiser


@pytest.mark.parametrize("targets", [LINEAR_NAMES, ("q_proj", "v_proj"), ("down_proj",)])
def test_lora_param_count_matches_peft_and_hand_count(targets):
    import torch
    from peft import LoraConfig, get_peft_model

    r = 8
    model = _tiny_llama()
    by_hand = sum(r * (m.in_features + m.out_features) for n, m in model.model.layers.named_modules()
                  if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=16, target_modules=list(targets)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    planned = plan_memory(TINY, PlanSettings(lora_r=r, lora_targets=targets)).details["lora_parameters"]
    assert planned == trainable == by_hand


@pytest.mark.parametrize("numel", [1000, 4095, 4096, 5000, 70_000])
def test_8bit_optimizer_state_bytes_match_bitsandbytes(numel):
    """bnb 8-bit AdamW on CPU: fp32 states under 4096 elements, else uint8 + fp32 absmax per 256."""
    import torch
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.randn(numel))
    opt = bnb.optim.AdamW8bit([p], lr=1e-3)
    p.grad = torch.randn(numel)
    opt.step()
    state = opt.state[p]
    per_param = sum(v.nbytes for k, v in state.items()
                    if torch.is_tensor(v) and k in ("state1", "state2", "absmax1", "absmax2"))
    assert per_param == optimizer_state_bytes(numel, "adamw_8bit", param_bytes=4)


# ----------------------------------------------------------------------------------------------
# Activations


def _saved_tensor_bytes(attention: str, lora_dropout: float, batch: int, seq: int) -> int:
    """Unique non-parameter storage autograd saves in a forward + HF loss of a tiny bf16 model with
    qlora's LoRA layers (what the planner models: on the CPU its dropout keeps no mask)."""
    import torch

    from qlora.adapters.spec import LoraSpec
    from qlora.adapters.surgery import apply_lora

    model = _tiny_llama(attn_implementation=attention).to(torch.bfloat16)
    apply_lora(model, LoraSpec(r=8, alpha=16, dropout=lora_dropout, targets=tuple(LINEAR_NAMES)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, TINY["vocab_size"], (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids).loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("attention,lora_dropout", [("sdpa", 0.0), ("eager", 0.0), ("sdpa", 0.1)])
def test_activation_formula_matches_saved_tensors(attention, lora_dropout):
    batch, seq = 2, 32
    measured = _saved_tensor_bytes(attention, lora_dropout, batch, seq)
    settings = PlanSettings(lora_r=8, seq_len=seq, micro_batch=batch, grad_checkpointing=False,
                            attention=attention, lora_dropout=lora_dropout, device="cpu")
    log_softmax = 4 * batch * seq * TINY["vocab_size"]  # the only loss tensor autograd saves
    planned = activation_bytes(shape_from_config(TINY), settings, grad_checkpointing=False) + log_softmax
    # the plan counts layer 0 as if its input needed a gradient (it does with checkpointing's
    # input-grad hook); without it layer 0 saves a little less, so the plan is a slight upper bound
    assert measured <= planned < 1.05 * measured


class _LiveTensorBytes:
    """Peak bytes of live tensor storage created inside the context (a TorchDispatchMode + weakrefs)."""

    def __enter__(self):
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live, self.current, self.peak = {}, 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in tracker.live:
                        storage = t.untyped_storage()
                        tracker.live[storage._cdata] = storage.nbytes()
                        tracker.current += storage.nbytes()
                        tracker.peak = max(tracker.peak, tracker.current)
                        weakref.finalize(storage, tracker._free, storage._cdata)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


_CKPT_GAP = pytest.mark.xfail(strict=True, reason=(
    "known gap: transformers' non-reentrant checkpointing keeps ~8 bytes per hidden unit per token per "
    "layer here, the plan counts the 2-byte layer input; the plan reads 14-29% low on small-vocab configs"))


@pytest.mark.parametrize("vocab,checkpointing", [(512, False), pytest.param(512, True, marks=_CKPT_GAP),
                                                 (8192, False), (8192, True)])
def test_step_peak_within_10_percent_of_measured(vocab, checkpointing):
    """Peak of the tensors one forward + backward creates (bf16 tiny LLaMA + peft LoRA, CPU) against
    the plan's step items; the 4-bit weights are checked byte-exactly above."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = {**TINY, "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 4, "vocab_size": vocab}
    model = _tiny_llama(**config).to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LINEAR_NAMES)),
                           autocast_adapter_dtype=False)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch, seq = 4, 128
    ids = torch.randint(0, vocab, (batch, seq))
    with _LiveTensorBytes() as live:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    plan = plan_memory(config, PlanSettings(lora_r=8, seq_len=seq, micro_batch=batch, loss="full",  # HF's loss
                                            grad_checkpointing=checkpointing, device="cpu"))
    step_items = ("lora_grads", "activations", "logits_and_loss", "layer_backward")
    planned = sum(plan.breakdown[k] for k in step_items)
    assert abs(planned - live.peak) <= 0.10 * live.peak, (planned, live.peak)


def test_monotonicity():
    base = PlanSettings()
    model = BUILTIN_MODELS["llama-7b"]
    plan = plan_memory(model, base)
    no_ckpt = plan_memory(model, dataclasses.replace(base, grad_checkpointing=False))
    assert plan.breakdown["activations"] < no_ckpt.breakdown["activations"]
    assert no_ckpt.breakdown["activations"] == plan.details["activations_without_checkpointing_bytes"]
    bigger_r = plan_memory(model, dataclasses.replace(base, lora_r=128))
    for item in ("lora_params", "lora_grads", "optimizer_states"):
        assert bigger_r.breakdown[item] > plan.breakdown[item]
    assert bigger_r.details["layer_activation_bytes"] > plan.details["layer_activation_bytes"]
    assert bigger_r.total_bytes > plan.total_bytes
    longer = plan_memory(model, dataclasses.replace(base, seq_len=2048))
    assert longer.breakdown["activations"] > plan.breakdown["activations"]
    assert longer.total_bytes > plan.total_bytes
    eager = plan_memory(model, dataclasses.replace(base, seq_len=2048, attention="eager", grad_checkpointing=False))
    sdpa = plan_memory(model, dataclasses.replace(base, seq_len=2048, grad_checkpointing=False))
    assert eager.breakdown["activations"] > sdpa.breakdown["activations"]
    no_dq = plan_memory(model, dataclasses.replace(base, double_quant=False))
    assert no_dq.breakdown["weights_4bit"] > plan.breakdown["weights_4bit"]
    fp32_states = plan_memory(model, dataclasses.replace(base, optimizer="paged_adamw_32bit"))
    assert fp32_states.breakdown["optimizer_states"] > 3.9 * plan.breakdown["optimizer_states"]
    cpu = plan_memory(model, dataclasses.replace(base, device="cpu"))
    assert cpu.breakdown["framework_overhead"] == 0 < plan.breakdown["framework_overhead"]


def test_bad_settings_name_the_field():
    for kwargs, field in [({"lora_r": 0}, "lora_r"), ({"seq_len": -1}, "seq_len"),
                          ({"lora_targets": ("qproj",)}, "lora_targets"), ({"optimizer": "sgd"}, "optimizer"),
                          ({"blocksize": 48}, "blocksize"), ({"compute_dtype": "fp8"}, "compute_dtype")]:
        with pytest.raises(UsageError, match=field):
            PlanSettings(**kwargs)


# ----------------------------------------------------------------------------------------------
# The headline and the CLI


def test_llama65b_fits_48gb():
    """QLoRA paper: 65B, NF4+DQ, r=64 all linear, seq 512, batch 1, checkpointing, paged 8-bit AdamW."""
    plan = plan_memory(BUILTIN_MODELS["llama-65b"], PlanSettings(
        lora_r=64, seq_len=512, micro_batch=1, grad_checkpointing=True, optimizer="paged_adamw_8bit",
        quant_type="nf4", blocksize=64, double_quant=True))
    assert plan.total_bytes < 48 * 10**9  # under 48 GB even in decimal units
    assert plan.fits(48 * GIB)
    assert max(plan.breakdown, key=plan.breakdown.get) == "weights_4bit"
    assert 33.0e9 < plan.breakdown["weights_4bit"] < 33.9e9  # 64.76e9 params * 4.127 / 8
    assert sum(plan.breakdown.values()) == plan.total_bytes
    # why checkpointing matters: without it the activations alone take 13 GiB and it no longer fits
    no_ckpt = plan_memory(BUILTIN_MODELS["llama-65b"], dataclasses.replace(plan.settings, grad_checkpointing=False))
    assert not no_ckpt.fits(48 * GIB)


def test_cli_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["memory", "llama-65b", "--lora-r", "64", "--seq-len", "512", "--batch", "1",
                 "--gpu-gb", "48", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "weights_4bit" in table and "fits" in table
    data = json.loads(out.read_text())
    plan = plan_memory(BUILTIN_MODELS["llama-65b"], PlanSettings())
    assert data["total_bytes"] == plan.total_bytes == sum(data["breakdown_bytes"].values())
    assert data["fits"] is True and data["gpu_bytes"] == 48 * GIB
    assert data["margin_bytes"] == 48 * GIB - plan.total_bytes
    assert f"{plan.total_bytes:,}" in table
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temp file left


def test_cli_config_path_and_settings(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    out = tmp_path / "tiny.json"
    assert main(["memory", str(tmp_path / "config.json"), "--lora-r", "8", "--lora-targets", "q_proj,v_proj",
                 "--no-grad-ckpt", "--device", "cpu", "--no-double-quant", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    expected = plan_memory(TINY, PlanSettings(lora_r=8, lora_targets=("q_proj", "v_proj"), grad_checkpointing=False,
                                              device="cpu", double_quant=False))
    assert data["total_bytes"] == expected.total_bytes
    assert data["settings"]["lora_targets"] == ["q_proj", "v_proj"]


def test_cli_unknown_model_exits_2_and_lists_builtins(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert main(["memory", "llama-99b", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "llama-99b" in err and "llama-65b" in err and "qwen2.5-72b" in err
    assert not out.exists()


@pytest.mark.parametrize("option,value", [("--lora-r", "0"), ("--seq-len", "abc"), ("--batch", "-2"),
                                          ("--gpu-gb", "0"), ("--lora-targets", "q_proj,foo"),
                                          ("--blocksize", "48"), ("--optim", "sgd")])
def test_cli_bad_numbers_exit_2_naming_option(option, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["memory", "llama-7b", option, value])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err


def test_settings_from_recipe_maps_the_trainer_settings():
    from pathlib import Path

    from qlora.recipe import load_recipe
    from qlora.memory.from_recipe import settings_from_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_135m_chat_cpu.yaml"
    s = settings_from_recipe(load_recipe(recipe), device="cpu")
    assert (s.lora_r, s.lora_targets, s.lora_dropout, s.seq_len, s.micro_batch) == (16, LINEAR_NAMES, 0.05, 256, 8)
    assert (s.grad_checkpointing, s.optimizer, s.loss, s.loss_chunk, s.device) == (False, "adamw_8bit",
                                                                                 "chunked", 1024, "cpu")
    names = settings_from_recipe(load_recipe(recipe, ["lora.targets=[self_attn.q_proj, v_proj]"]))
    assert names.lora_targets == ("q_proj", "v_proj")
    regex = settings_from_recipe(load_recipe(recipe, [r"lora.targets=re:.*mlp\..*"]))
    assert regex.lora_targets == ("gate_proj", "up_proj", "down_proj")
    assert settings_from_recipe(load_recipe(recipe, ["train.loss_chunk_size=0"])).loss == "full"
    packing = ["data.packing=true", "data.group_by_length=false"]
    assert not s.packed and settings_from_recipe(load_recipe(recipe, packing)).packed
    flash = [*packing, "model.attn_implementation=flash_attention_2"]
    assert not settings_from_recipe(load_recipe(recipe, flash)).packed  # varlen kernels need no mask
    with pytest.raises(UsageError, match="quant.enabled"):
        settings_from_recipe(load_recipe(recipe, ["quant.enabled=false"]))
    with pytest.raises(UsageError, match="lm_head"):
        settings_from_recipe(load_recipe(recipe, ["lora.targets=[lm_head]"]))


def test_chunked_loss_counts_target_tokens_only():
    """qlora.nn.loss.CausalLMLoss: 12 bytes per chunk token per vocabulary entry at its backward peak
    (fp32 log-softmax output, its gradient, the upcast's gradient) plus the kept hidden states."""
    from qlora.memory.plan import logits_loss_bytes

    shape = shape_from_config(TINY)
    s = PlanSettings(seq_len=65, micro_batch=2, loss="chunked", loss_chunk=100)
    targets = 2 * 64
    assert logits_loss_bytes(shape, s) == 12 * 100 * 512 + targets * (2 * 64 + 8)
    fewer = dataclasses.replace(s, target_tokens=30)
    assert logits_loss_bytes(shape, fewer) == 12 * 30 * 512 + 30 * (2 * 64 + 8)
    with pytest.raises(UsageError, match="target_tokens"):
        dataclasses.replace(s, target_tokens=10_000)


RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_cli_plans_each_shipped_recipe_as_the_trainer_runs_it(recipe, tmp_path, capsys):
    from qlora.memory.from_recipe import recipe_shape, settings_from_recipe
    from qlora.memory.preference import planner_for
    from qlora.recipe import load_recipe

    out = tmp_path / "plan.json"
    assert main(["memory", str(recipe), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    cfg = load_recipe(recipe)
    settings = settings_from_recipe(cfg, device="cuda" if cfg.train.device == "auto" else cfg.train.device)
    expected = planner_for(cfg)(recipe_shape(cfg)[0], settings)  # plan_memory, or a preference step's
    data = json.loads(out.read_text())
    assert data["total_bytes"] == expected.total_bytes
    assert data["settings"]["loss"] == ("chunked" if cfg.train.loss_chunk_size else "full") == settings.loss
    assert (data["settings"]["lora_r"], data["settings"]["micro_batch"], data["settings"]["optimizer"]) == \
        (cfg.lora.r, expected.settings.micro_batch, cfg.optim.name)
    assert data["settings"]["grad_checkpointing"] == cfg.train.gradient_checkpointing
    assert "as `qlora train` runs it" in printed and f"{expected.total_bytes:,}" in printed


def test_cli_recipe_shapes_overrides_and_refusals(tmp_path, capsys):
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "llama3_8b_qlora_24gb.yaml")
    assert main(["memory", recipe, "lora.r=8", "--gpu-gb", "24", "--json", str(tmp_path / "a.json")]) == 0
    assert "built-in shape llama3-8b (models/Meta-Llama-3-8B is not on this machine)" in capsys.readouterr().out
    assert json.loads((tmp_path / "a.json").read_text())["settings"]["lora_r"] == 8
    assert main(["memory", recipe, "--model", "mistral-7b"]) == 0
    assert "mistral-7b (--model)" in capsys.readouterr().out
    assert main(["memory", recipe, "--seq-len", "2048"]) == 2
    assert "--seq-len: the recipe decides these" in capsys.readouterr().err
    assert main(["memory", recipe, "model.name_or_path=models/llama3_8b_typo"]) == 2
    err = capsys.readouterr().err
    assert "model.name_or_path 'models/llama3_8b_typo'" in err and "--model" in err
    assert main(["memory", "llama-7b", "lora.r=8"]) == 2 and "need a recipe" in capsys.readouterr().err


def test_cli_unknown_model_suggests_the_close_name(capsys):
    assert main(["memory", "llama3_8b"]) == 2
    assert "did you mean 'llama3-8b'" in capsys.readouterr().err


def test_packed_rows_add_the_attention_mask_kept_by_checkpointed_layers():
    """Packed rows (positions restarting per document, `qlora.data.batching.pack`) make transformers
    build a b x 1 x s x s boolean mask for SDPA; checkpointed layers keep it for their recomputation.
    Measured: the step's peak grows by the mask plus the per-row rotary tables (~10% here)."""
    import torch

    from qlora.memory.plan import attention_mask_bytes

    batch, seq = 4, 512
    settings = PlanSettings(seq_len=seq, micro_batch=batch, packed=True, grad_checkpointing=True, device="cpu")
    peaks = []
    for packed in (False, True):
        model = _tiny_llama(attn_implementation="sdpa").to(torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        ids = torch.randint(0, TINY["vocab_size"], (batch, seq))
        kwargs = {"position_ids": torch.tensor([list(range(200)) + list(range(seq - 200))] * batch)} if packed else {}
        with _LiveTensorBytes() as live:
            model(input_ids=ids, labels=ids, use_cache=False, **kwargs).loss.backward()
        peaks.append(live.peak)
    mask = attention_mask_bytes(settings)
    assert mask == batch * seq * seq
    assert mask <= peaks[1] - peaks[0] <= 1.2 * mask, (peaks, mask)
    assert plan_memory(TINY, settings).breakdown["attention_mask"] == mask
    unpacked = dataclasses.replace(settings, packed=False, micro_batch=1)
    assert attention_mask_bytes(unpacked) == 0  # one unpadded row: SDPA's causal kernel, no mask
    assert attention_mask_bytes(dataclasses.replace(settings, grad_checkpointing=False)) == 0


def test_cli_recipe_plans_its_own_device_and_gpu_budget(tmp_path, capsys):
    """The CPU recipe is planned on cpu with no GPU verdict; a recipe named *_24gb is checked
    against 24 GiB; --device / --gpu-gb still override both."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    assert main(["memory", str(recipes / "smollm2_135m_chat_cpu.yaml"), "--json", str(tmp_path / "c.json")]) == 0
    printed = capsys.readouterr().out
    assert "device cpu (train.device)" in printed and "bf16, cpu" in printed
    assert "no GPU budget checked" in printed and "GPU 48 GiB" not in printed
    assert json.loads((tmp_path / "c.json").read_text())["settings"]["device"] == "cpu"
    assert main(["memory", str(recipes / "llama3_8b_qlora_24gb.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "GPU 24 GiB (the recipe name)" in printed and "GPU 24 GiB: fits" in printed
    assert main(["memory", str(recipes / "llama3_8b_qlora_24gb.yaml"), "--gpu-gb", "16", "--device", "cuda"]) == 0
    assert "GPU 16 GiB: " in capsys.readouterr().out
