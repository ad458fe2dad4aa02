"""Mixture-of-experts sections: one Mixtral-8x7B-shaped layer's 4-bit grouped expert matmul against
bf16 `torch._grouped_mm`, and a Mixtral-8x7B-shaped QLoRA step with expert LoRA under a 48 GiB cap.

The layer: `MixtralExperts` with random bf16 weights, the same module with `Experts4bit` NF4 +
double-quant stores and the "qlora" experts implementation (`qlora.nn.moe.experts_forward`), the
same tokens and routing (top-2 of 8, seeded). Checked: ours against transformers' `grouped_mm`
implementation on the dequantised weights (equal up to bf16 rounding of the sums), and timed, fwd
and fwd+bwd, against transformers' `grouped_mm` on the bf16 weights (`torch._grouped_mm` on a GPU
that has it). The step: the model is built on the device layer by layer, every linear quantised to
`Linear4bit` and every fused expert weight to `Experts4bit` as it is made (the 16-bit stack of one
layer at a time), LoRA r=16 on all linears and all experts (`target_parameters="all-experts"`), one
optimiser step; its peak `max_memory_allocated` against the plan's allocated part (train_sections).
"""

from __future__ import annotations

import gc

import torch

from gpucheck.common import Context, Row, row, timed
from gpucheck.train_sections import empty_model, step_under_cap


def mixtral_config(smoke: bool, layers: int | None = None):
    from transformers import MixtralConfig

    if smoke:
        return MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=512)
    return MixtralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers or 32,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         vocab_size=32000, max_position_embeddings=4096)


def layer_pair(config, ctx: Context):
    """(transformers' bf16 experts module, ours with NF4 stores) sharing one set of random weights."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from qlora.nn.moe import quantize_experts, register
    from qlora.quant.format import QuantFormat

    register()
    torch.manual_seed(0)
    peer = MixtralExperts(config).to(ctx.device, torch.bfloat16).requires_grad_(False)
    for p in peer.parameters():
        p.normal_(0, 0.02)
    ours = MixtralExperts(type(config)(**config.to_dict())).to(ctx.device).requires_grad_(False)
    for name in ("gate_up_proj", "down_proj"):
        ours._parameters[name] = torch.nn.Parameter(getattr(peer, name).detach().clone(), requires_grad=False)
    quantize_experts(ours, QuantFormat(compute_dtype=torch.bfloat16))
    ours.config._experts_implementation = "qlora"
    return peer, ours


def expert_layer(ctx: Context) -> list[Row]:
    config = mixtral_config(ctx.smoke)
    tokens = 256 if ctx.smoke else 8192
    peer, ours = layer_pair(config, ctx)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(tokens, config.hidden_size, generator=g) * 0.5).to(ctx.device, torch.bfloat16)
    logits = torch.randn(tokens, config.num_local_experts, generator=g)
    top, index = logits.topk(config.num_experts_per_tok, dim=-1)
    weights, index = torch.softmax(top, -1).to(ctx.device, torch.bfloat16), index.to(ctx.device)
    peer.config._experts_implementation = "grouped_mm"
    with torch.no_grad():
        dequantised = type(peer)(peer.config).to(ctx.device, torch.bfloat16)
        dequantised.gate_up_proj.copy_(ours.gate_up_proj.dequantize())
        dequantised.down_proj.copy_(ours.down_proj.dequantize())
        want, got = dequantised(x, index, weights), ours(x, index, weights)
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    del dequantised
    rows = [row("moe", "4-bit experts forward vs grouped_mm on the dequantised weights", err < 1e-2, err,
                "rel. error", "relative Frobenius error; bf16 sums in another order stay below 1e-2")]

    def fwd(module):
        return lambda: module(x, index, weights)

    def fwd_bwd(module):
        def run():
            xg = x.detach().requires_grad_(True)
            module(xg, index, weights).sum().backward()
        return run

    for what, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
        ours_s, peer_s = timed(make(ours), ctx.device, ctx.repeat), timed(make(peer), ctx.device, ctx.repeat)
        rows.append(row("moe", f"{what}: 4-bit experts / bf16 grouped_mm speed", None, peer_s / ours_s, "x",
                        f"ours {ours_s * 1e3:.2f} ms, bf16 grouped_mm {peer_s * 1e3:.2f} ms; {tokens} tokens, "
                        f"top-{config.num_experts_per_tok} of {config.num_local_experts}, hidden {config.hidden_size}"))
    return rows


def build_moe(config, ctx: Context, r: int):
    """A random Mixtral on the device, quantised layer by layer as it is made, LoRA on linears and experts."""
    from qlora.adapters.spec import LoraSpec
    from qlora.adapters.surgery import apply_lora, prepare_for_training
    from qlora.nn import Linear4bit
    from qlora.nn.moe import is_experts, quantize_experts, use_qlora_experts
    from qlora.nn.swap import swap_modules
    from qlora.quant.format import QuantFormat

    model, fmt = empty_model(config, ctx), QuantFormat()
    for layer in model.model.layers:
        layer.to_empty(device=ctx.device)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() >= 2 else torch.nn.init.ones_(p)
        swap_modules(layer, lambda m, _: type(m) is torch.nn.Linear, lambda m: Linear4bit.quantize(m.weight, fmt))
        for module in [m for m in layer.modules() if is_experts(m)]:
            quantize_experts(module, fmt)
        gc.collect()
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        module.to_empty(device=ctx.device)
        torch.nn.init.normal_(module.weight, std=0.02) if module.weight.dim() == 2 else torch.nn.init.ones_(module.weight)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(ctx.device)
    use_qlora_experts(model)
    apply_lora(model, LoraSpec(r=r, alpha=16, dropout=0.0, target_parameters="all-experts"))
    return prepare_for_training(model, gradient_checkpointing=True)


def mixtral_step(ctx: Context) -> list[Row]:
    config, seq = mixtral_config(ctx.smoke), 64 if ctx.smoke else 2048
    return step_under_cap(ctx, "moe-step", "Mixtral-8x7B QLoRA step with expert LoRA under a 48 GiB cap", config,
                          lambda: build_moe(config, ctx, r=16), seq, 16,
                          lora_dropout=0.0, lora_target_parameters=("all-experts",))
