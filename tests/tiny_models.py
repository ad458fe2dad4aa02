"""Tiny random causal LMs of several families, built in-process and saved as HF folders (bf16)."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=False)
    if family == "llama-tied":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=32)
    if family == "qwen2":  # q/k/v carry biases
        return tf.Qwen2Config(**COMMON, tie_word_embeddings=True)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**COMMON, pad_token_id=0, bos_token_id=0, eos_token_id=1)
    if family == "gpt2":  # Conv1D layers with (in, out) weights, tied lm_head
        return tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=1)
    if family == "gpt_neox":  # the checkpoint calls its head `embed_out`
        return tf.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False)
    if family in MOE_FAMILIES:
        return _moe_config(tf, family)
    raise ValueError(family)


# Every causal-LM mixture-of-experts family of transformers 5 that the MoE tests load.
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "granitemoe", "phimoe")
MOE = dict(num_experts_per_tok=2)


def _moe_config(tf, family: str):
    experts = dict(num_local_experts=4, **MOE)
    if family == "mixtral":
        return tf.MixtralConfig(**COMMON, **experts)
    if family == "qwen2_moe":  # plus a shared expert (an ordinary MLP of linears)
        return tf.Qwen2MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, **MOE)
    if family == "qwen3_moe":
        return tf.Qwen3MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=32, head_dim=16, **MOE)
    if family == "olmoe":
        return tf.OlmoeConfig(**COMMON, num_experts=4, **MOE)
    if family == "gpt_oss":  # (E, in, out) layout, interleaved gate/up, expert biases
        return tf.GptOssConfig(**COMMON, head_dim=16, sliding_window=32, **experts)
    if family == "deepseek_v3":  # first layer dense, one shared expert, MLA attention
        base = {**COMMON, "num_key_value_heads": 4}
        return tf.DeepseekV3Config(**base, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                                   first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                                   qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1, **MOE)
    if family == "granitemoe":  # fused 3-D experts in the checkpoint itself
        return tf.GraniteMoeConfig(**COMMON, **experts)
    return tf.PhimoeConfig(**COMMON, **experts)


def save_tiny(family: str, folder: Path, seed: int = 0, **save_kwargs) -> Path:
    """Build a random ``family`` model (bf16, fixed seed), save it to ``folder``; return the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).to(torch.bfloat16)
    with torch.no_grad():  # larger than the 0.02 init, so 4-bit rounding shows in the logits
        for p in model.parameters():
            if p.dim() in (2, 3):  # 3-D: fused experts
                p.normal_(0, 0.1)
    model.save_pretrained(folder, **save_kwargs)
    return Path(folder)


def tokens(n: int = 2, length: int = 12, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g)


def randomise_lora_b(model, seed: int = 2, std: float = 0.05) -> None:
    """Give every LoRA B a random value so the adapters change the output (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def saved_adapter(base: Path, out: Path, spec, seed: int = 2) -> Path:
    """A LoRA adapter per `spec` on the 16-bit `base` folder with random B's, saved to `out`."""
    from qlora.adapters.peft_format import save_adapter
    from qlora.adapters.surgery import apply_lora
    from qlora.hf.load import load_model

    model = load_model(base, quant=None)
    apply_lora(model, spec)
    randomise_lora_b(model, seed=seed)
    return save_adapter(model, out, spec, str(base))
