"""Tests for the mixture-of-experts planner (`qlora.memory.moe`, `qlora.memory.moe_spec`).

Oracles: transformers 5.24's own MoE modules built on `meta` (parameter counts, fused expert shapes,
linears of dense and sparse layers), peft 0.21's `target_parameters` adapters (expert LoRA sizes),
the published parameter counts of each built-in model (source and counting convention named), and
the dense planner's own byte formulas for what the MoE plan shares with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlora.cli import main  # noqa: E402
from qlora.errors import UsageError  # noqa: E402
from qlora.memory import BUILTIN_MODELS, PlanSettings, model_shape, plan_memory, quantised_tensor_bytes  # noqa: E402
from qlora.memory.moe import expert_lora_sizes, expert_lora_targets  # noqa: E402
from qlora.memory.moe_models import MOE_CONFIGS  # noqa: E402
from qlora.memory.moe_spec import expert_matrices, layer_linears, parameter_counts  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
MOE = [name for name, shape in BUILTIN_MODELS.items() if shape.moe is not None]

# (name, total, active, source). The sources count the embeddings differently; `convention` says
# how, as the figure that matches it: "both" adds the input embedding table to our `active` (which
# counts the lm_head but not the embedding lookup), "lm_head" is our `active` as it is.
PUBLISHED = [
    ("mixtral-8x7b", "46.7e9", "12.9e9", "both", "Mistral AI, 'Mixtral of experts' (Dec 2023): 46.7B total, 12.9B per token"),
    ("mixtral-8x22b", "141e9", "39e9", "both", "Mistral AI, 'Cheaper, Better, Faster, Stronger' (Apr 2024): 39B active of 141B"),
    ("qwen3-30b-a3b", "30.5e9", "3.3e9", "both", "Qwen/Qwen3-30B-A3B model card: 30.5B in total and 3.3B activated"),
    ("gpt-oss-20b", "21e9", "3.6e9", "lm_head", "openai/gpt-oss-20b model card: 21B parameters with 3.6B active"),
    ("deepseek-v2-lite", "15.7e9", "2.4e9", "lm_head", "DeepSeek-V2 paper / DeepSeek-V2-Lite card: 15.7B total, 2.4B activated"),
    ("olmoe-1b-7b", "6.9e9", "1.3e9", "both", "OLMoE paper (Muennighoff et al. 2024): 6.9B total, 1.3B active"),
]


def _close(count: int, published: str) -> bool:
    """Within one unit of the last published digit (sources round or truncate)."""
    mantissa, exponent = published.split("e")
    unit = 10 ** (int(exponent) - len(mantissa.partition(".")[2]))
    return abs(count - float(published)) < unit


def test_every_moe_builtin_is_tested():
    assert {p[0] for p in PUBLISHED} == set(MOE) == set(MOE_CONFIGS)


@pytest.mark.parametrize("name,total,active,convention,source", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_builtin_counts_match_published(name, total, active, convention, source):
    counts = parameter_counts(BUILTIN_MODELS[name])
    assert BUILTIN_MODELS[name].num_parameters() == counts["total"]
    assert _close(counts["total"], total), source
    ours = counts["active"] + (counts["embedding"] if convention == "both" else 0)
    assert _close(ours, active), source


def _transformers_model(config: dict, device: str = "meta"):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf)


TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=300, tie_word_embeddings=False)
FAMILIES = {  # tiny configs exercising each layout rule: sparse steps, dense layers, shared experts, MLA
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, head_dim=24,
                      decoder_sparse_step=2, mlp_only_layers=[3]),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40,
                      shared_expert_intermediate_size=80, mlp_only_layers=[0]),
    "olmoe": dict(num_experts=6, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),  # block_sparse_moe.experts.*
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, attention_bias=True),  # LayerNorms with biases
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, attention_bias=True),
    "deepseek_v2": dict(n_routed_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=2,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=40, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4, n_group=2, topk_group=1),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_shapes_match_transformers_modules(family):
    """Parameter count, fused expert shapes, sparse layers and per-layer linears equal transformers'."""
    import torch

    config = {"model_type": family, **TINY, **FAMILIES[family]}
    model = _transformers_model(config)
    shape = model_shape_from(config)
    assert shape.num_parameters() == model.num_parameters()
    spec = shape.moe
    for index, layer in enumerate(model.model.layers):
        experts = getattr(getattr(layer, spec.block), "experts", None)
        assert (index in spec.moe_layers) == (experts is not None), index
        linears = {n: (m.in_features, m.out_features) for n, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear) and n != f"{spec.block}.router"}  # PhiMoE's router is a
        # Linear; the plan keeps every router in 16 bits apart from the quantised linears
        assert linears == layer_linears(shape, index in spec.moe_layers), index
        if experts is not None:
            for name, (n_in, n_out) in expert_matrices(shape).items():
                fused = getattr(experts, name.rpartition(".")[2]).shape
                assert fused[0] == spec.num_experts and sorted(fused[1:]) == sorted((n_in, n_out))


def model_shape_from(config: dict):
    from qlora.memory import shape_from_config

    return shape_from_config(config, name=config["model_type"])


@pytest.mark.parametrize("name", MOE)
def test_builtin_shapes_match_transformers_modules(name):
    """The whole built-in model built by transformers on `meta` from the same fields: same count."""
    assert _transformers_model(MOE_CONFIGS[name]).num_parameters() == BUILTIN_MODELS[name].num_parameters()


def test_expert_lora_sizes_equal_peft_target_parameters():
    """peft 0.21 `LoraConfig(target_parameters=...)` on a tiny Mixtral: lora_A (r*E, in), lora_B (out, r*E)."""
    import peft
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config = {"model_type": "mixtral", **TINY, **FAMILIES["mixtral"]}
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**{k: v for k, v in config.items() if k != "model_type"}))
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=[], target_parameters=targets))
    theirs = sorted(p.numel() for n, p in wrapped.named_parameters() if "lora_" in n)
    shape = model_shape_from(config)
    s = PlanSettings(lora_r=4, lora_target_parameters=("all-experts",))
    ours = expert_lora_sizes(shape, s, expert_lora_targets(shape, s.lora_target_parameters))
    assert sorted(ours) == theirs


# ----------------------------------------------------------------------------------------------
# The plan's items


def _plan(name="mixtral-8x7b", **changes):
    return plan_memory(BUILTIN_MODELS[name], PlanSettings(lora_r=16, seq_len=2048, **changes))


def test_experts_are_each_their_own_4bit_quantisation():
    shape, plan = BUILTIN_MODELS["mixtral-8x7b"], _plan()
    per_expert = sum(quantised_tensor_bytes(i * o) for i, o in expert_matrices(shape).values())
    assert plan.breakdown["experts_4bit"] == 32 * 8 * per_expert
    bits = 8 * plan.breakdown["experts_4bit"] / parameter_counts(shape)["experts"]
    assert bits == pytest.approx(4.127, abs=5e-4)  # NF4 + double quant at block 64 (qlora.memory.plan)
    assert plan.breakdown["routers"] == 2 * 32 * 8 * 4096  # bf16, never quantised
    assert _plan("deepseek-v2-lite").breakdown["routers"] == 4 * 26 * 64 * 2048  # DeepSeek keeps them fp32


def test_activation_memory_follows_routed_experts_not_all_experts():
    """Doubling the experts doubles expert weights, but activations grow only by the router's
    per-expert terms (bf16 logits + fp32 softmax); doubling top-k doubles the routed part."""
    shape = BUILTIN_MODELS["mixtral-8x7b"]
    more = dataclasses.replace(shape, moe=dataclasses.replace(shape.moe, num_experts=16))
    top4 = dataclasses.replace(shape, moe=dataclasses.replace(shape.moe, experts_per_token=4))
    s = PlanSettings(lora_r=16, seq_len=2048)
    base, wide, deep = (plan_memory(m, s) for m in (shape, more, top4))
    assert wide.breakdown["experts_4bit"] == 2 * base.breakdown["experts_4bit"]
    tokens = 2048
    assert wide.details["layer_activation_bytes"] - base.details["layer_activation_bytes"] == tokens * 8 * (2 + 4)
    routed_pass = 3 * 2 * 14336 + 2 * 4096  # SwiGLU (gate/up output, SiLU output) + the expert output, bf16
    router_topk = 8 + 2  # int64 index + bf16 weight per routed pass
    assert deep.details["layer_activation_bytes"] - base.details["layer_activation_bytes"] == \
        tokens * 2 * (routed_pass + router_topk)
    assert wide.breakdown["router_logits"] == 32 * tokens * 16 * 4


def test_expert_lora_counts_weights_grads_and_states():
    none, both, down = _plan(), _plan(lora_target_parameters=("all-experts",)), \
        _plan(lora_target_parameters=("mlp.experts.down_proj",))
    per_layer = 16 * 8 * ((4096 + 2 * 14336) + (14336 + 4096))  # r*E*(in+out) of gate_up and down
    assert none.breakdown["expert_lora_params"] == 0 and none.details["expert_lora_parameters"] == 0
    assert both.details["expert_lora_parameters"] == 32 * per_layer
    assert both.breakdown["expert_lora_params"] == both.breakdown["expert_lora_grads"] == 2 * 32 * per_layer
    assert down.details["expert_lora_parameters"] == 32 * 16 * 8 * (14336 + 4096)
    # paged 8-bit AdamW: two uint8 states + one fp32 absmax per 256 elements, per tensor
    assert both.breakdown["expert_lora_optimizer"] == pytest.approx(2 * 32 * per_layer * (1 + 4 / 256))
    assert both.total_bytes > none.total_bytes


def test_target_parameters_suffixes_and_bad_entries():
    shape = BUILTIN_MODELS["deepseek-v2-lite"]  # layer 0 is dense
    every = expert_lora_targets(shape, ("all-experts",))
    assert len(every) == 2 * 26 and (0, "mlp.experts.down_proj") not in every
    assert expert_lora_targets(shape, ("experts.gate_up_proj", "down_proj")) == every
    assert expert_lora_targets(shape, ("model.layers.5.mlp.experts.down_proj",)) == [(5, "mlp.experts.down_proj")]
    with pytest.raises(UsageError, match="lora.target_parameters entry 'mlp.experts.w1'.*gate_up_proj"):
        expert_lora_targets(shape, ("mlp.experts.w1",))
    with pytest.raises(UsageError, match="lora.target_parameters.*llama3-8b is a dense model"):
        plan_memory(BUILTIN_MODELS["llama3-8b"], PlanSettings(lora_target_parameters=("all-experts",)))


def test_workspaces_and_shared_items():
    plan = _plan("qwen3-30b-a3b")
    assert plan.breakdown["expert_workspace"] == 2 * 2048 * 2 * 768  # one bf16 gate_up matrix of one expert
    assert plan.breakdown["dequant_workspace"] == 2 * 2 * 2048 * 4096  # 2 x q_proj / o_proj in bf16
    assert plan.breakdown["activations"] == 48 * 2 * 2048 * 2048 + 2048 * (4 * 2048 + 4)  # layer inputs + final norm
    assert sum(plan.breakdown.values()) == plan.total_bytes


# ----------------------------------------------------------------------------------------------
# config.json folders, the CLI and the shipped recipes


def test_moe_config_json_folder_plans_as_the_builtin(tmp_path, capsys):
    hub = {**MOE_CONFIGS["qwen3-30b-a3b"], "architectures": ["Qwen3MoeForCausalLM"], "norm_topk_prob": True,
           "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    shape = model_shape(str(tmp_path))
    assert shape.moe == BUILTIN_MODELS["qwen3-30b-a3b"].moe
    out = tmp_path / "plan.json"
    args = ["memory", str(tmp_path), "--lora-r", "16", "--seq-len", "2048", "--lora-target-parameters", "all-experts"]
    assert main([*args, "--gpu-gb", "24", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    expected = plan_memory(BUILTIN_MODELS["qwen3-30b-a3b"],
                           PlanSettings(lora_r=16, seq_len=2048, lora_target_parameters=("all-experts",)))
    assert data["breakdown_bytes"] == expected.breakdown
    assert data["details"]["active_parameters"] == parameter_counts(shape)["active"]
    assert data["settings"]["lora_target_parameters"] == ["all-experts"] and data["fits"]
    assert "3.042B active per token" in capsys.readouterr().out


def test_cli_mixtral_8x7b_fits_48gb(capsys):
    assert main(["memory", "mixtral-8x7b", "--lora-r", "16", "--seq-len", "2048", "--gpu-gb", "48"]) == 0
    out = capsys.readouterr().out
    assert "GPU 48 GiB: fits" in out and "experts_4bit" in out
    assert main(["memory", "Mixtral-8x22B", "--lora-r", "16", "--seq-len", "2048", "--gpu-gb", "48"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["memory", "mixtral-8x7b", "--lora-target-parameters", "mlp.experts.w2"]) == 2
    assert "lora.target_parameters entry 'mlp.experts.w2'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe,gib", [("mixtral_8x7b_qlora_48gb", 48), ("qwen3_30b_a3b_qlora_24gb", 24)])
def test_moe_recipes_fit_their_gpu_with_expert_lora(recipe, gib, tmp_path, capsys):
    from qlora.recipe import load_recipe

    path = RECIPES / f"{recipe}.yaml"
    assert load_recipe(path).lora.target_parameters == "all-experts"
    out = tmp_path / "plan.json"
    assert main(["memory", str(path), "--gpu-gb", str(gib), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["fits"] and data["breakdown_bytes"]["expert_lora_params"] > 0
    assert "and experts (all-experts)" in capsys.readouterr().out


def test_recipe_with_a_moe_model_folder(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(MOE_CONFIGS["olmoe-1b-7b"]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  name_or_path: {tmp_path / 'model'}\nlora:\n  dropout: 0.0\n  target_parameters: [down_proj]\n")
    assert main(["memory", str(recipe), "--json", str(tmp_path / "p.json")]) == 0
    assert f"shape from {tmp_path / 'model' / 'config.json'}" in capsys.readouterr().out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["details"]["expert_lora_parameters"] == 16 * 16 * 64 * (1024 + 2048)  # r * layers * E * (in+out)


def test_gpt_oss_is_planned_with_eager_attention():
    """transformers' gpt-oss has no SDPA path (`_supports_sdpa = False`: attention sinks)."""
    sdpa, eager = _plan("gpt-oss-20b"), _plan("gpt-oss-20b", attention="eager")
    assert sdpa.breakdown == eager.breakdown and "no SDPA path" in sdpa.notes["activations"]
    assert sdpa.breakdown["attention_mask"] == 2 * 2048 ** 2  # eager's bf16 b x s x s mask
    assert _plan("mixtral-8x7b").breakdown != _plan("mixtral-8x7b", attention="eager").breakdown


def _saved_bytes(fn, frozen) -> int:
    """Bytes of the distinct storages autograd saves while `fn` runs, parameters excluded."""
    import torch

    params, seen = {p.data_ptr() for p in frozen}, {}

    def pack(x):
        if x.data_ptr() not in params:
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("family,extra", [
    ("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    ("qwen3_moe", dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=128, head_dim=64)),
    ("olmoe", dict(num_experts=16, num_experts_per_tok=4, eos_token_id=1, pad_token_id=0)),
    ("deepseek_v2", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=2,
                         q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                         num_key_value_heads=4)),
])
def test_decoder_layer_activations_match_autograd(family, extra):
    """One sparse decoder layer of transformers' own bf16 model, everything frozen (frozen experts,
    like the 4-bit store, save no input for a weight gradient), SDPA on the CPU: the tensors
    autograd saves are within 4% of the plan's norms + attention + router + k routed passes +
    shared experts per token (measured: Mixtral 0.973, Qwen3-MoE 0.968, OLMoE 0.984, DeepSeek-V2
    0.996 with its fp32 math-path attention)."""
    import torch

    from qlora.memory.moe import frozen_layer_token_bytes

    tokens = 1024
    config = {"model_type": family, **TINY, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1,
              "attn_implementation": "sdpa", **extra}
    model = _transformers_model(config, device="cpu").to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(1, tokens, 256, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(tokens)[None]
    layer, rotary = model.model.layers[0], model.model.rotary_emb(x, positions)
    assert layer.mlp.experts is not None
    measured = _saved_bytes(lambda: layer(x, attention_mask=None, position_ids=positions, position_embeddings=rotary),
                            model.parameters())
    settings = PlanSettings(seq_len=tokens, device="cpu")
    planned = tokens * frozen_layer_token_bytes(model_shape_from(config), settings, sparse=True)[0]
    assert planned / measured == pytest.approx(1.0, abs=0.04)


def test_attention_matches_the_dense_plan_on_a_dense_layer():
    """A dense layer of a MoE shape (DeepSeek's first layer) and the dense plan's LLaMA layer of the
    same widths keep the same bytes per token, with and without LoRA dropout, SDPA and eager."""
    from qlora.memory.moe import layer_token_bytes
    from qlora.memory.plan import layer_activation_bytes

    mixtral = BUILTIN_MODELS["mixtral-8x7b"]
    dense = dataclasses.replace(mixtral, moe=None)
    for attention, dropout in (("sdpa", 0.0), ("eager", 0.0), ("sdpa", 0.05), ("eager", 0.1)):
        s = PlanSettings(lora_r=16, seq_len=512, attention=attention, lora_dropout=dropout)
        assert 512 * layer_token_bytes(mixtral, s, sparse=False, lora_params=set()) == layer_activation_bytes(dense, s)
