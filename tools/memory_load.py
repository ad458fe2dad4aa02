"""Peak anonymous memory while loading a ~1B-parameter Llama in 4 bits: ours against transformers + bnb.

    python tools/memory_load.py [--layers 22] [--hidden 2048] [--dir DIR] [--keep]

1. Writes a synthetic Llama (TinyLlama-1.1B's shapes by default: hidden 2048, MLP 5632, 22 layers,
   32 query / 4 key-value heads, vocabulary 32,000, untied lm_head) as bf16 safetensors shards, one
   shard per decoder layer, with random N(0, 0.02) weights. Each layer is generated, written and freed
   before the next, so building the folder needs one layer of memory, not the model.
2. In a fresh subprocess each (so one measurement cannot inherit another's heap), measures the
   anonymous RSS (`RssAnon`, sampled every 2 ms by `qlora.memory.profile.RssSampler`) of:
     baseline  the imports only (torch, transformers, accelerate, bitsandbytes, qlora; the same in
               every child), nothing loaded;
     ours      `qlora.hf.load.load_model(folder)`: NF4, blocksize 64, double quant, bf16 compute,
               lm_head kept in bf16 (the default), streamed from the mmapped shards;
     peer      `AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
               load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
               bnb_4bit_compute_dtype=torch.bfloat16), dtype=torch.bfloat16)` on the CPU
               (bitsandbytes also keeps lm_head in bf16).
   File-backed pages of the mmapped shards are not anonymous memory and are not counted (they would
   dominate `ru_maxrss`, which is why it is not used). Each child reports its own post-import RSS,
   its peak during the load and the bytes of the loaded model's tensors.
3. Prints the table: the 4-bit model's bytes, each loader's peak over its own import baseline, the
   ratio ours / peer and the target of the loader design (peak over baseline <= 1.5 x the 4-bit
   model + 300 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 10**6


def build_model(folder: Path, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                vocab: int, seed: int = 0) -> int:
    """Write the synthetic Llama shard by shard; returns its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         tie_word_embeddings=False, max_position_embeddings=2048, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(folder)
    head_dim = hidden // heads
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    shards: list[dict] = [{"model.embed_tokens.weight": lambda: rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": lambda: rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": lambda: rand(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": lambda: rand(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": lambda: rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": lambda: rand(intermediate, hidden),
            p + "mlp.up_proj.weight": lambda: rand(intermediate, hidden),
            p + "mlp.down_proj.weight": lambda: rand(hidden, intermediate),
            p + "input_layernorm.weight": lambda: torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": lambda: torch.ones(hidden, dtype=torch.bfloat16),
        })
    shards.append({"model.norm.weight": lambda: torch.ones(hidden, dtype=torch.bfloat16),
                   "lm_head.weight": lambda: rand(vocab, hidden)})
    weight_map, total_bytes, params = {}, 0, 0
    for n, makers in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: make() for key, make in makers.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total_bytes += t.nbytes
            params += t.numel()
        del tensors
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return params


# ------------------------------------------------------------------------------------------ children


def _imports() -> None:
    """The same imports in every child (both loaders' libraries), so each baseline is comparable."""
    import accelerate  # noqa: F401
    import bitsandbytes  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import qlora.hf.load  # noqa: F401


def tensor_bytes(model) -> int:
    """Bytes of the model's distinct tensor storages (parameters, buffers, 4-bit quantisation states)."""
    import torch

    from qlora.memory.profile import quant_state_tensors

    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        tensors += quant_state_tensors(getattr(module, "quant_state", None))
        weight = getattr(module, "weight", None)  # bitsandbytes keeps its state on the Params4bit
        tensors += _bnb_state_tensors(getattr(weight, "quant_state", None))
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _bnb_state_tensors(state) -> list:
    if state is None or not hasattr(state, "absmax"):
        return []
    tensors = [state.absmax, state.code]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, nested.code, getattr(state, "offset", None)]
    return tensors


def child(which: str, folder: str) -> dict:
    """Run in a subprocess: one load (or none, for the baseline), measured; returns the figures."""
    from qlora.memory.profile import RssSampler, rss_anon_bytes

    _imports()
    import torch

    torch.set_num_threads(int(os.environ.get("QLORA_LOAD_THREADS", "2")))
    result = {"which": which, "baseline_rss_anon": rss_anon_bytes()}
    if which == "baseline":
        return result
    sampler = RssSampler(interval_s=0.002).start()
    t0 = time.perf_counter()
    if which == "ours":
        from qlora.hf.load import load_model

        model = load_model(folder)
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, dtype=torch.bfloat16,
                                                     device_map="cpu")
    seconds = time.perf_counter() - t0
    sampler.stop()
    result.update(load_seconds=round(seconds, 2), peak_rss_anon=sampler.peak(), after_rss_anon=rss_anon_bytes(),
                  model_tensor_bytes=tensor_bytes(model), samples=len(sampler.samples))
    return result


def run_child(which: str, folder: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, "--child", which, str(folder)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{which} load failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ report


def report(results: dict[str, dict], params: int) -> str:
    ours, peer, base = results["ours"], results["peer"], results["baseline"]
    four_bit = ours["model_tensor_bytes"]
    target = 1.5 * four_bit + 300 * MB
    rows = [("parameters", f"{params / 1e9:.3f} B"),
            ("bf16 checkpoint", f"{2 * params / MB:,.0f} MB"),
            ("4-bit model (ours, tensors)", f"{four_bit / MB:,.0f} MB"),
            ("4-bit model (peer, tensors)", f"{peer['model_tensor_bytes'] / MB:,.0f} MB"),
            ("imports only (RssAnon)", f"{base['baseline_rss_anon'] / MB:,.0f} MB")]
    for name, r in (("ours", ours), ("peer", peer)):
        over = r["peak_rss_anon"] - r["baseline_rss_anon"]
        rows.append((f"{name}: peak over its baseline", f"{over / MB:,.0f} MB  ({over / four_bit:.2f} x 4-bit; "
                     f"load {r['load_seconds']:.1f} s, baseline {r['baseline_rss_anon'] / MB:,.0f} MB)"))
    ours_over = ours["peak_rss_anon"] - ours["baseline_rss_anon"]
    peer_over = peer["peak_rss_anon"] - peer["baseline_rss_anon"]
    rows.append(("ratio ours / peer", f"{ours_over / peer_over:.2f}"))
    verdict = "met" if ours_over <= target else "MISSED"
    rows.append(("target 1.5 x 4-bit + 300 MB", f"{target / MB:,.0f} MB: {verdict}"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", nargs=2, metavar=("WHICH", "FOLDER"), help=argparse.SUPPRESS)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dir", type=Path, help="where to write the synthetic model (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic model folder")
    p.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp) / "synthetic-llama"
        folder.mkdir()
        t0 = time.perf_counter()
        params = build_model(folder, args.hidden, args.intermediate, args.layers, args.heads, args.kv_heads, args.vocab)
        print(f"synthetic Llama: {params / 1e9:.3f}B params written in {time.perf_counter() - t0:.0f} s; "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        results = {which: run_child(which, folder) for which in ("baseline", "ours", "peer")}
        print(f"load average after the loads: {os.getloadavg()[0]:.2f}")
        if args.keep:
            kept = (args.dir or Path.cwd()) / "synthetic-llama"
            folder.rename(kept)
            print(f"kept the model in {kept}")
    print(report(results, params))
    if args.json:
        from qlora.io import write_json_atomic

        write_json_atomic(args.json, {"parameters": params, "results": results, "load_average": os.getloadavg()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
