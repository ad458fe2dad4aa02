"""Mixture-of-experts: every transformers MoE family loads (16-bit equal to from_pretrained, NF4 with
every expert weight in 4 bits), the experts store is bitsandbytes' bytes per expert, decodes only
routed experts, and expert LoRA equals PEFT 0.21's target_parameters LoRA (logits, gradients, files).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora.adapters.peft_format import save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.errors import UsageError
from qlora.hf.load import load_model
from qlora.nn.experts4bit import Experts4bit
from qlora.nn.moe import ExpertLoRA, experts_forward, is_experts
from qlora.quant.format import QuantFormat
from test_quant import assert_double_quant_matches_bnb, same_offset
from tiny_models import MOE_FAMILIES, randomise_lora_b, save_tiny, tokens

FP32_NF4 = QuantFormat(compute_dtype=torch.float32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {fam: save_tiny(fam, root / fam) for fam in (*MOE_FAMILIES, "gpt_neox")}


@pytest.mark.parametrize("family", (*MOE_FAMILIES, "gpt_neox"))
def test_family_loads_16bit_as_from_pretrained_and_nf4_with_every_expert_4bit(folders, family):
    from transformers import AutoModelForCausalLM

    folder = folders[family]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokens()
    ours = load_model(folder, quant=None, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    nf4 = load_model(folder, quant=FP32_NF4, dtype=torch.float32)
    experts = [m for m in nf4.modules() if is_experts(m)]
    assert len(experts) == (0 if family == "gpt_neox" else 1 if family == "deepseek_v3" else 2)
    assert not [n for n, p in nf4.named_parameters() if p.dim() == 3]  # no 16-bit expert stack is left
    for module in experts:
        for name in ("down_proj", "gate_up_proj"):
            assert isinstance(getattr(module, name), Experts4bit)
    with torch.no_grad():
        assert torch.isfinite(nf4(ids).logits).all()


def test_fused_checkpoint_loads_the_same_bytes(tmp_path):
    per_expert = save_tiny("mixtral", tmp_path / "a")
    fused = save_tiny("mixtral", tmp_path / "b", save_original_format=False)
    a, b = (load_model(f, quant=FP32_NF4, dtype=torch.float32) for f in (per_expert, fused))
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_store_is_bitsandbytes_bytes_per_expert():
    functional = pytest.importorskip("bitsandbytes.functional")
    stack = torch.randn(3, 96, 64, dtype=torch.bfloat16)
    store = Experts4bit.quantize(stack, QuantFormat())
    assert abs(store.bits_per_weight - 4.127) < 0.01
    for e in range(3):
        packed, state = functional.quantize_4bit(stack[e], quant_type="nf4", blocksize=64, compress_statistics=True)
        ours = store.state(e)
        assert torch.equal(store.packed_of(e), packed)
        assert_double_quant_matches_bnb(stack[e], ours, state)  # what bit-exact means (quant/backends.py)
        if same_offset(ours, state):
            assert torch.equal(store.dequantize(e), functional.dequantize_4bit(packed, state))


def _moe_layer(tmp_path):
    model = load_model(save_tiny("mixtral", tmp_path / "m"), quant=FP32_NF4, dtype=torch.float32)
    return model, model.model.layers[0].mlp.experts


def test_forward_decodes_only_routed_experts_and_equals_16bit_experts(tmp_path):
    _, experts = _moe_layer(tmp_path)
    x = torch.randn(6, 64, requires_grad=True)
    index = torch.tensor([[0, 2]] * 6)  # experts 1 and 3 get no token
    weights = torch.rand(6, 2)
    stores = [experts.gate_up_proj, experts.down_proj]
    before = [s.decoded for s in stores]
    y = experts_forward(experts, x, index, weights)
    assert [s.decoded - b for s, b in zip(stores, before)] == [2, 2]  # 2 of 4 experts decoded

    dense = type(experts)(experts.config)  # transformers' own experts on the dequantised weights
    dense.gate_up_proj.data, dense.down_proj.data = stores[0].dequantize(), stores[1].dequantize()
    x2 = x.detach().clone().requires_grad_(True)
    dense.config._experts_implementation = "eager"
    ref = dense(x2, index, weights)
    experts.config._experts_implementation = "qlora"
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def _peft_pair(folder: Path, targets=("q_proj",), params=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
    """(our 16-bit fp32 model with expert LoRA, PEFT's with the same adapter weights)."""
    import peft
    from transformers import AutoModelForCausalLM

    ours = load_model(folder, quant=None, dtype=torch.float32)
    apply_lora(ours, LoraSpec(r=2, alpha=4, dropout=0.0, targets=targets, dtype="fp32", target_parameters=params))
    randomise_lora_b(ours)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets),
                                                       target_parameters=list(params)))
    ours_sd = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
               for k, v in ours.state_dict().items() if "lora_" in k}
    theirs_sd = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert ours_sd.keys() == theirs_sd.keys()
    theirs.load_state_dict({f"base_model.model.{k}": v for k, v in ours_sd.items()}, strict=False)
    return ours, theirs


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_lora_logits_and_gradients_equal_peft(folders, family):
    ours, theirs = _peft_pair(folders[family])
    ids = tokens()
    a, b = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    a.float().pow(2).mean().backward()
    b.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                    for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == theirs_grads.keys() and len(grads) == 2 * 2 + 2 * 2 * 2  # q_proj + both expert weights, 2 layers
    for name, grad in grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_peft_loads_our_expert_adapter_with_our_logits(folders, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    folder = folders["mixtral"]
    ours = load_model(folder, quant=None, dtype=torch.float32)
    spec = LoraSpec(r=2, alpha=4, dropout=0.0, targets="all-linear", dtype="fp32", target_parameters="all-experts")
    apply_lora(ours, spec)
    randomise_lora_b(ours)
    save_adapter(ours, tmp_path / "adapter", spec, str(folder))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_nf4_expert_lora_trains_only_adapters(folders):
    model = load_model(folders["qwen2_moe"], quant=FP32_NF4, dtype=torch.float32)
    apply_lora(model, LoraSpec(r=2, alpha=4, dropout=0.0, targets="all-linear", dtype="fp32",
                               target_parameters="all-experts"))
    randomise_lora_b(model)
    model(tokens()).logits.pow(2).mean().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("experts.base_layer.lora_A" in n for n in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if p.requires_grad and "experts" in n)
    assert not any("router" in n or n.endswith("mlp.gate.weight") for n in trainable)


@pytest.mark.parametrize("spec, key", [
    (dict(target_parameters=("mlp.experts.w9",)), "lora.target_parameters"),
    (dict(target_parameters="all-experts", use_dora=True), "lora.use_dora"),
    (dict(target_parameters="all-experts", dropout=0.1), "lora.dropout"),
    (dict(target_parameters="all-experts", init="loftq"), "lora.init"),
])
def test_bad_expert_lora_settings_name_the_key(folders, spec, key):
    model = load_model(folders["mixtral"], quant=None, dtype=torch.float32)
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        apply_lora(model, LoraSpec(r=2, alpha=4, **{"dropout": 0.0, **spec}))


def test_all_experts_on_a_dense_model_is_refused(folders):
    model = load_model(folders["gpt_neox"], quant=None, dtype=torch.float32)
    with pytest.raises(UsageError, match="no fused experts"):
        apply_lora(model, LoraSpec(r=2, alpha=4, dropout=0.0, target_parameters="all-experts"))


def test_expert_of_another_shape_is_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_tiny("mixtral", tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UsageError, match=r"experts\.2\.w1\.weight"):
        load_model(folder, quant=FP32_NF4)


def test_mxfp4_checkpoint_is_refused_with_what_to_do(tmp_path):
    folder = save_tiny("gpt_oss", tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="mxfp4.*dequantize=True"):
        load_model(folder)


def test_unused_checkpoint_tensors_are_refused(tmp_path):
    folder = save_tiny("mixtral", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"have no place.*layers\.1\."):
        load_model(folder, quant=None)


def test_expert_lora_wrappers_nest_as_peft(folders):
    model = load_model(folders["mixtral"], quant=FP32_NF4, dtype=torch.float32)
    apply_lora(model, LoraSpec(r=2, alpha=4, dropout=0.0, targets=("q_proj",), target_parameters="all-experts"))
    outer = model.model.layers[0].mlp.experts
    assert isinstance(outer, ExpertLoRA) and outer.parameter_name == "down_proj"
    assert isinstance(outer.base_layer, ExpertLoRA) and outer.base_layer.parameter_name == "gate_up_proj"
    assert outer.lora_A.weight.shape == (2 * 4, 128) and outer.lora_B.weight.shape == (64, 2 * 4)


@pytest.mark.parametrize("router_logits", [False, True])
def test_loss_adds_the_load_balancing_term_as_transformers_does(tmp_path, router_logits):
    from transformers import AutoModelForCausalLM

    from qlora.nn.loss import CausalLMLoss

    folder = save_tiny("mixtral", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "output_router_logits": router_logits,
                                                    "router_aux_loss_coef": 0.5}))
    ours = load_model(folder, quant=None, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokens()
    mask = torch.ones_like(ids)
    total, count = CausalLMLoss(ours)(ids, mask, ids.clone())
    expected = ref(input_ids=ids, attention_mask=mask, labels=ids).loss
    torch.testing.assert_close(total / count, expected, rtol=1e-5, atol=1e-5)
    plain = ref(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=False).loss
    assert (total / count - plain).abs() > 1e-3 if router_logits else torch.allclose(total / count, plain)


def test_tiny_moe_recipe_through_the_cli_writes_an_adapter_peft_loads(tmp_path, offline):
    """The shipped MoE smoke recipe, end to end: train, then PEFT reads the adapter with our logits,
    and `qlora eval` / `qlora merge` take it."""
    import subprocess
    import sys

    import peft
    from transformers import AutoModelForCausalLM

    from qlora.adapters.peft_format import load_adapter
    from qlora.hf.embedded import builtin_folder

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_moe_smoke.yaml"
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "qlora.cli", "train", str(recipe), f"output.dir={run}"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    folder = builtin_folder("tiny-mixtral")
    ours = load_model(folder, quant=None, dtype=torch.float32)
    load_adapter(ours, run / "adapter", dtype="fp32")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                            run / "adapter").eval()
    ids = tokens(vocab=49152)
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - base).abs().max() > 1e-3  # the adapter changes the model
    merged = subprocess.run([sys.executable, "-m", "qlora.cli", "merge", str(run / "adapter"), str(tmp_path / "m")],
                            capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr[-2000:]
    with torch.no_grad():
        m = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(m, a, rtol=0, atol=0.05)  # bf16 merged weights


def test_quantize_refuses_fused_experts_and_writes_nothing(tmp_path):
    from qlora.hf.export import quantize_folder

    folder = save_tiny("mixtral", tmp_path / "m")
    with pytest.raises(UsageError, match="experts store.*qlora merge"):
        quantize_folder(str(folder), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_adapter_set_hot_swaps_expert_adapters(folders, tmp_path):
    from qlora.adapters.multi import AdapterSet

    folder = folders["mixtral"]
    spec = LoraSpec(r=2, alpha=4, dropout=0.0, targets=("q_proj",), dtype="fp32", target_parameters="all-experts")
    ids, logits = tokens(), {}
    for seed in (2, 3):  # two adapters, each saved with the logits it gives
        model = load_model(folder, quant=None, dtype=torch.float32)
        apply_lora(model, spec)
        randomise_lora_b(model, seed=seed)
        save_adapter(model, tmp_path / f"a{seed}", spec, str(folder))
        with torch.no_grad():
            logits[seed] = model(ids).logits
    model = load_model(folder, quant=None, dtype=torch.float32)
    with torch.no_grad():
        base = model(ids).logits
    adapters = AdapterSet(model, "fp32")
    for seed in (2, 3):
        adapters.load_adapter(tmp_path / f"a{seed}", f"a{seed}")
    with torch.no_grad():
        for name, want in (("a2", logits[2]), ("a3", logits[3]), (None, base), ("a2", logits[2])):
            adapters.set_adapter(name)
            torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="fused experts"):
        with adapters.mixed(["a2", "a3"]):
            pass


def test_combine_keeps_expert_targets_and_refuses_rank_mixing_methods(folders, tmp_path):
    from qlora.adapters.combine import combine_adapters

    folder = folders["mixtral"]
    spec = LoraSpec(r=2, alpha=4, dropout=0.0, targets=("q_proj",), dtype="fp32", target_parameters="all-experts")
    model = load_model(folder, quant=None, dtype=torch.float32)
    apply_lora(model, spec)
    randomise_lora_b(model)
    save_adapter(model, tmp_path / "a", spec, str(folder))
    for method, density in (("cat", None), ("svd", None), ("dare_linear_svd", 0.5)):
        with pytest.raises(UsageError, match="factor method"):
            combine_adapters([tmp_path / "a", tmp_path / "a"], [0.5, 0.5], tmp_path / method, method, density=density)
        assert not (tmp_path / method).exists()
    combine_adapters([tmp_path / "a", tmp_path / "a"], [0.5, 0.5], tmp_path / "lin", "linear")
    config = json.loads((tmp_path / "lin" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    fresh = load_model(folder, quant=None, dtype=torch.float32)
    from qlora.adapters.peft_format import load_adapter

    load_adapter(fresh, tmp_path / "lin", dtype="fp32")  # the combined adapter fits the experts
