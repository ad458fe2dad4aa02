"""Sections of whole training steps: a ~1.3B Llama (ours vs transformers + PEFT + bitsandbytes, and
the memory plan), and a LLaMA-65B-shaped model under a 48 GiB cap.

The plan against the measurement, like with like: `torch.cuda.max_memory_allocated` counts the
tensors the caching allocator handed out, not the CUDA context (kernels, cuBLAS workspace: the
plan's `framework_overhead`), so the compared plan leaves the context out and the context is
reported on its own (measured as the device's used memory minus what torch reserved). The plan's
`dequant_workspace` counts two weights; the code reuses one buffer per device and dtype
(`qlora.nn.linear4bit.weight_workspace`), so the compared plan counts one.
"""

from __future__ import annotations

import gc
import time

import torch

from gpucheck.common import GIB, Context, Row, gib, peak_bytes, reset_peak, row, timed


def llama_config(kind: str, smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)
    shapes = {"1.3b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16),
              "65b": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64)}
    return LlamaConfig(**shapes[kind], vocab_size=32000, max_position_embeddings=2048)


def empty_model(config, ctx: Context):
    """The model's modules with no storage: accelerate's init_empty_weights, else torch.device("meta")."""
    from transformers import AutoModelForCausalLM

    if ctx.has("accelerate"):
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.device("meta"):  # buffers too: the rotary table is rebuilt on the device below
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def build_ours(config, ctx: Context, r: int):
    """Random Llama on the device, its linears quantised layer by layer as they are made; LoRA on top."""
    from qlora.adapters.spec import LoraSpec
    from qlora.adapters.surgery import apply_lora, prepare_for_training
    from qlora.nn import Linear4bit
    from qlora.nn.swap import swap_modules
    from qlora.quant.format import QuantFormat

    model, fmt = empty_model(config, ctx), QuantFormat()
    for layer in model.model.layers:  # one layer of bf16 weights at a time
        layer.to_empty(device=ctx.device)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() == 2 else torch.nn.init.ones_(p)
        swap_modules(layer, lambda m, _: isinstance(m, torch.nn.Linear), lambda m: Linear4bit.quantize(m.weight, fmt))
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        module.to_empty(device=ctx.device)
        torch.nn.init.normal_(module.weight, std=0.02) if module.weight.dim() == 2 else torch.nn.init.ones_(module.weight)
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(ctx.device)  # real buffers
    apply_lora(model, LoraSpec(r=r, alpha=16, dropout=0.05))
    return prepare_for_training(model, gradient_checkpointing=True)


def optimizer_name(ctx: Context) -> str:
    """The QLoRA paper's paged 8-bit AdamW when bitsandbytes works here, else qlora's AdamW."""
    return "paged_adamw_8bit" if ctx.has("bitsandbytes") else "adamw"


def step_ours(model, ctx: Context, batch: int, seq: int, vocab: int, steps: int) -> dict:
    from qlora.config import OptimConfig
    from qlora.nn.loss import CausalLMLoss
    from qlora.training.optim import build_optimizer

    loss_fn, name = CausalLMLoss(model), optimizer_name(ctx)
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=1e-4))
    ids = torch.randint(0, vocab, (batch, seq), device=ctx.device)
    mask = torch.ones_like(ids)

    def one() -> None:
        total, n = loss_fn(ids, mask, ids)
        (total / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one()  # warm-up: optimiser states, kernels
    reset_peak(ctx.device)
    seconds = timed(one, ctx.device, steps)
    return {"tokens_per_s": batch * seq / seconds, "peak_bytes": peak_bytes(ctx.device), "optimizer": name}


def step_peer(config, ctx: Context, batch: int, seq: int, steps: int) -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(ctx.tmp)
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(ctx.tmp, quantization_config=qc, dtype=torch.bfloat16,
                                                 device_map={"": ctx.device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    cls = bnb.optim.PagedAdamW8bit if ctx.cuda else bnb.optim.AdamW8bit
    optimizer = cls([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=ctx.device)

    def one() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one()
    reset_peak(ctx.device)
    seconds = timed(one, ctx.device, steps)
    return {"tokens_per_s": batch * seq / seconds, "peak_bytes": peak_bytes(ctx.device)}


def plan_rows(section: str, config, ctx: Context, seq: int, batch: int, r: int, optimizer: str,
              measured: int | None, **settings_changes) -> list[Row]:
    """The plan's allocated part against max_memory_allocated, and the CUDA context apart (module docstring).

    `settings_changes`: PlanSettings fields the run set otherwise (expert LoRA, no dropout).
    """
    from qlora.memory import PlanSettings, plan_memory, shape_from_config

    if not measured:
        return []
    settings = PlanSettings(**{**dict(lora_r=r, seq_len=seq, micro_batch=batch, grad_checkpointing=True,
                                      optimizer=optimizer, loss="chunked", device="cuda" if ctx.cuda else "cpu",
                                      lora_dropout=0.05), **settings_changes})
    plan = plan_memory(shape_from_config(config.to_dict(), "check"), settings)
    context = plan.breakdown["framework_overhead"]
    allocated = plan.total_bytes - context - plan.breakdown["dequant_workspace"] // 2
    rows = [row(section, "plan / measured max_memory_allocated", abs(allocated / measured - 1) <= 0.10,
                allocated / measured, "x", f"plan {gib(allocated)} (total {gib(plan.total_bytes)} less the CUDA "
                f"context and one of its two workspaces) vs {gib(measured)}; within 10% passes")]
    if ctx.cuda:
        free, total = torch.cuda.mem_get_info(ctx.device)
        outside = total - free - torch.cuda.memory_reserved(ctx.device)
        rows.append(row(section, "CUDA context: planned vs measured", None, outside / GIB, "GiB",
                        f"planned {gib(context)}; measured = device used - torch reserved (other processes count too)"))
    return rows


def training_step(ctx: Context) -> list[Row]:
    config = llama_config("1.3b", ctx.smoke)
    batch, seq, steps = (2, 64, 2) if ctx.smoke else (4, 1024, 5)
    reset_peak(ctx.device)
    ours = step_ours(build_ours(config, ctx, r=16), ctx, batch, seq, config.vocab_size, steps)
    gc.collect()
    rows = [row("step", f"ours ~1.3B Llama, {batch}x{seq} tokens", None, ours["tokens_per_s"], "tokens/s",
                f"peak {gib(ours['peak_bytes'])}; optimiser {ours['optimizer']}")]
    if ctx.has("bitsandbytes") and ctx.has("peft"):
        peer = step_peer(config, ctx, batch, seq, steps)
        rows.append(row("step", "ours / peer tokens/s", ours["tokens_per_s"] >= peer["tokens_per_s"],
                        ours["tokens_per_s"] / peer["tokens_per_s"], "x",
                        f"peer {peer['tokens_per_s']:.0f} tokens/s, peak {gib(peer['peak_bytes'])}; "
                        "optimiser bitsandbytes PagedAdamW8bit"))
    else:
        rows.append(row("step", "transformers + PEFT + bitsandbytes", None,
                        detail="skipped: " + "; ".join(ctx.found[k].detail for k in ("bitsandbytes", "peft")
                                                       if not ctx.has(k))))
    return rows + plan_rows("step", config, ctx, seq, batch, 16, ours["optimizer"], ours["peak_bytes"])


def step_under_cap(ctx: Context, section: str, title: str, config, build, seq: int, r: int,
                   **plan_changes) -> list[Row]:
    """Build a model with `build()` and run one QLoRA step under a 48 GiB cap (the budget of one
    48 GB GPU); its rows, and the plan against the measured peak."""
    if ctx.cuda:
        total = torch.cuda.get_device_properties(ctx.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 48 * GIB / total), ctx.device)
    reset_peak(ctx.device)
    try:
        t0 = time.perf_counter()
        model = build()
        built = time.perf_counter() - t0
        result = step_ours(model, ctx, 1, seq, config.vocab_size, 1)
    except torch.OutOfMemoryError as err:
        return [row(section, title, False, detail=f"out of memory: {err}")]
    finally:
        if ctx.cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, ctx.device)
    rows = [row(section, title, True, result["tokens_per_s"], "tokens/s",
                f"built + quantised on the device in {built:.0f} s; peak {gib(result['peak_bytes'])}; "
                f"optimiser {result['optimizer']}; {seq} tokens")]
    return rows + plan_rows(section, config, ctx, seq, 1, r, result["optimizer"], result["peak_bytes"], **plan_changes)


def headline_65b(ctx: Context) -> list[Row]:
    config, seq = llama_config("65b", ctx.smoke), 64 if ctx.smoke else 512
    return step_under_cap(ctx, "65b", "LLaMA-65B QLoRA step under a 48 GiB cap", config,
                          lambda: build_ours(config, ctx, r=64), seq, 64)
