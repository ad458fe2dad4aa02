#!/usr/bin/env python
"""Benchmark one mixture-of-experts layer: qlora's 4-bit experts against transformers' 16-bit ones.

    python tools/bench_moe.py [--experts 8] [--top-k 2] [--hidden 1024] [--intermediate 3584]
                              [--tokens 4096] [--repeat 5] [--threads 2]

Both contenders are a Mixtral experts module (`MixtralExperts`, SwiGLU, fused gate_up_proj
(E, 2I, H) and down_proj (E, H, I)) with the same random weights, fed the same bf16 tokens and the
same routing (top-k experts per token drawn with a fixed seed, softmax weights):

    peer  transformers' own experts with bf16 weights, through its experts registry: the default
          implementation (`grouped_mm`; on CPU transformers' grouped fallback) and `eager`
    ours  the same module with `qlora.nn.experts4bit.Experts4bit` NF4 + double-quant stores and
          the "qlora" implementation (`qlora.nn.moe.experts_forward`): each routed expert is
          decoded on the fly, forward and again in backward

Timed: forward + backward to the input (the experts are frozen in QLoRA; the gradient flows to
earlier adapters), median over `--repeat` rounds run round-robin after a warm-up, on a machine
first left quiet (`bench_quant.wait_until_quiet`). Also printed: the expert matrices each forward
decodes against a decode-everything approach (all E experts of both weights), for this batch and
for one decoding token (top-k of E experts), which is where routing saves the most.
Target (issue "Mixture-of-experts"): ours >= 0.8x the peer's speed; decoded <= routed / all.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(args: argparse.Namespace):
    """(config, peer experts module in bf16, ours with NF4 stores) sharing one set of weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from qlora.nn.moe import quantize_experts, register
    from qlora.quant.format import QuantFormat

    register()
    torch.manual_seed(0)
    peer_cfg = MixtralConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                             num_local_experts=args.experts, num_experts_per_tok=args.top_k)
    ours_cfg = MixtralConfig(**peer_cfg.to_dict())
    peer = MixtralExperts(peer_cfg).to(torch.bfloat16).requires_grad_(False)
    for p in peer.parameters():
        p.normal_(0, 0.02)
    ours = MixtralExperts(ours_cfg).requires_grad_(False)
    for name in ("gate_up_proj", "down_proj"):
        ours._parameters[name] = torch.nn.Parameter(getattr(peer, name).detach().clone(), requires_grad=False)
    quantize_experts(ours, QuantFormat(compute_dtype=torch.bfloat16))
    ours_cfg._experts_implementation = "qlora"
    return peer_cfg, peer, ours


def make_model(folder: Path) -> Path:
    """A random Mixtral whose experts dominate its weights (hidden 256, 8 experts of intermediate 1024,
    top-2, 4 layers, SmolLM2's tokenizer), saved in the hub's per-expert layout, for
    `tools/bench_train.py --model FOLDER --recipe recipes/tiny_moe_smoke.yaml`."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from qlora.hf.embedded import TINY_LLAMA, _copy_tokenizer

    shape = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4}
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**shape, num_local_experts=8, num_experts_per_tok=2))
    model.to(torch.bfloat16).save_pretrained(folder)
    _copy_tokenizer(folder)
    return folder


def routing(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(tokens, experts, generator=g)
    weights, index = logits.topk(top_k, dim=-1)
    return index, torch.softmax(weights, dim=-1).to(torch.bfloat16)


def step(module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    x = x.detach().requires_grad_(True)
    y = module(x, index, weights)
    y.backward(torch.ones_like(y))


def time_round_robin(contenders: dict, repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up: thread pools, oneDNN caches, the workspace
        fn()
    for _ in range(repeat):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def decoded(ours, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> int:
    stores = [ours.gate_up_proj, ours.down_proj]
    before = sum(s.decoded for s in stores)
    with torch.no_grad():
        ours(x, index, weights)
    return sum(s.decoded for s in stores) - before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=3584, help="per expert (Mixtral's 3.5x hidden)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-busy", type=float, default=0.25)
    p.add_argument("--max-wait", type=float, default=60.0)
    p.add_argument("--make-model", type=Path, metavar="DIR",
                   help="only write the training benchmark's MoE model folder to DIR (see make_model)")
    args = p.parse_args(argv)
    if args.make_model:
        print(f"wrote {make_model(args.make_model)}")
        return 0
    from bench_quant import wait_until_quiet

    torch.set_num_threads(args.threads)
    cfg, peer, ours = build(args)
    x = torch.randn(args.tokens, args.hidden, dtype=torch.bfloat16)
    index, weights = routing(args.tokens, args.experts, args.top_k)
    default = "grouped_mm"  # what a MixtralForCausalLM picks on this torch (a bare module has none)

    def peer_as(impl: str):
        def run():
            cfg._experts_implementation = impl
            step(peer, x, index, weights)
        return run

    print(wait_until_quiet(args.max_busy, args.max_wait))
    medians = time_round_robin({f"peer {default}": peer_as(default), "peer eager": peer_as("eager"),
                                "ours nf4": lambda: step(ours, x, index, weights)}, args.repeat)
    best_peer = min(v for k, v in medians.items() if k.startswith("peer"))
    print(f"MoE layer fwd+bwd: {args.experts} experts top-{args.top_k}, hidden {args.hidden}, "
          f"intermediate {args.intermediate}, {args.tokens} tokens, bf16, {args.threads} threads")
    for name, seconds in medians.items():
        print(f"  {name:<18} {seconds * 1e3:9.1f} ms")
    print(f"  speed ours / fastest peer: {best_peer / medians['ours nf4']:.2f}x (target >= 0.8x)")
    everything = 2 * args.experts
    for label, n in (("this batch", args.tokens), ("one token", 1)):
        got = decoded(ours, x[:n], index[:n], weights[:n])
        routed = len(set(index[:n].flatten().tolist()))
        print(f"  decoded expert matrices, {label}: {got} of {everything} "
              f"({got / everything:.2f}; routed / all = {routed / args.experts:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
