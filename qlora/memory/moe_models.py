"""Built-in mixture-of-experts shapes: the architecture fields of each model's published `config.json`.

`qlora.memory.configs` reads these through the same `shape_from_config` as any config.json, so a
built-in name and the downloaded folder give the same plan. Only the fields the planner reads are
kept; each entry names the hub repository whose `config.json` the values are from (cross-checked
against transformers 5.24's modeling code for the layer layout).
"""

from __future__ import annotations

MOE_CONFIGS: dict[str, dict] = {
    # mistralai/Mixtral-8x7B-v0.1 config.json (MixtralConfig's defaults in transformers are this model).
    "mixtral-8x7b": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        num_local_experts=8, num_experts_per_tok=2),
    # mistralai/Mixtral-8x22B-v0.1 config.json (the Instruct release has a 32,768-token vocabulary).
    "mixtral-8x22b": dict(
        model_type="mixtral", hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
        num_attention_heads=48, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
        num_local_experts=8, num_experts_per_tok=2),
    # Qwen/Qwen3-30B-A3B config.json: 48 sparse layers (decoder_sparse_step 1, no mlp_only_layers),
    # head_dim 128 with per-head q/k norms.
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=151936, tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[]),
    # openai/gpt-oss-20b config.json: attention biases and sinks, expert and router biases; the
    # checkpoint's experts are MXFP4 (the planner counts them requantised to the recipe's 4-bit format).
    "gpt-oss-20b": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
        tie_word_embeddings=False, attention_bias=True, num_local_experts=32, num_experts_per_tok=4),
    # deepseek-ai/DeepSeek-V2-Lite config.json: multi-head latent attention without a q low-rank
    # (q_lora_rank null), layer 0 dense (first_k_dense_replace 1), 2 shared + 64 routed experts, top-6.
    "deepseek-v2-lite": dict(
        model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, vocab_size=102400,
        tie_word_embeddings=False, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1),
    # allenai/OLMoE-1B-7B-0924 config.json: q/k norms over the full q and k widths.
    "olmoe-1b-7b": dict(
        model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, tie_word_embeddings=False,
        num_experts=64, num_experts_per_tok=8),
}

# Hub names of the same shapes (lower-cased repository names; the instruct/chat tunes keep the shape).
MOE_ALIASES = {
    "mixtral-8x7b-v0.1": "mixtral-8x7b", "mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
    "mixtral-8x22b-v0.1": "mixtral-8x22b",
    "qwen3-30b-a3b-base": "qwen3-30b-a3b", "qwen3-30b-a3b-instruct-2507": "qwen3-30b-a3b",
    "olmoe-1b-7b-0924": "olmoe-1b-7b", "olmoe-1b-7b-0924-instruct": "olmoe-1b-7b",
    "deepseek-v2-lite-chat": "deepseek-v2-lite",
}
