"""Switch latency and memory per adapter of several LoRA adapters on one 4-bit base.

    python -m tools.bench_adapters [RECIPE] [--adapters N] [--adapter DIR ...] [--switches K]

Loads the recipe's base (default: the main job, the embedded SmolLM2-135M in NF4), then N
adapters of the recipe's `lora` spec with random weights (or the given adapter folders) into one
`AdapterSet`, and prints:
- memory per added adapter: its tensors' bytes, and the process's anonymous resident memory
  (RssAnon, /proc/self/status) before and after each load (file pages of the read safetensors
  stay resident, so RssAnon, not the peak RSS, is the honest number; see DESIGN.md);
- switch latency: median and 99th percentile of `set_adapter` over K switches that cycle through
  the adapters, and of `set_adapter(None)`;
- one forward of a mixed batch (rows cycling through the adapters) against the same batch with one
  adapter, as a ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from qlora.adapters.multi import AdapterSet
from qlora.adapters.peft_format import peft_key, write_adapter
from qlora.adapters.surgery import lora_filter
from qlora.hf.load import load_base_model
from qlora.recipe import load_recipe

MAIN_JOB = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_135m_chat_cpu.yaml"


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def random_adapter(model, spec, folder: Path, seed: int, base: str) -> Path:
    """An adapter of `spec` on `model` with random A and B (a stand-in for a trained one)."""
    keep, g = lora_filter(model, spec.targets), torch.Generator().manual_seed(seed)
    tensors = {}
    for fqn, module in model.named_modules():
        if keep(module, fqn):
            tensors[peft_key(fqn, "lora_A")] = torch.randn(spec.r, module.in_features, generator=g).to(torch.bfloat16)
            tensors[peft_key(fqn, "lora_B")] = torch.randn(module.out_features, spec.r, generator=g).to(torch.bfloat16) * 0.01
    leaves = sorted({key.split(".")[-3] for key in tensors})
    return write_adapter(folder, tensors, spec.peft_config(leaves, base))


def timed(fn, repeats: int) -> list[float]:
    """Seconds per call of `fn`, `repeats` times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def report(label: str, times: list[float]) -> None:
    q99 = sorted(times)[int(0.99 * (len(times) - 1))]
    print(f"{label}: median {statistics.median(times) * 1e6:.1f} us, p99 {q99 * 1e6:.1f} us over {len(times)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default=str(MAIN_JOB))
    parser.add_argument("--adapters", type=int, default=4, help="random adapters to load (default 4)")
    parser.add_argument("--adapter", action="append", default=[], help="load these folders instead")
    parser.add_argument("--switches", type=int, default=2000)
    args = parser.parse_args()
    cfg = load_recipe(args.recipe, [])
    torch.set_num_threads(cfg.train.threads)
    model = load_base_model(cfg, torch.device("cpu")).eval()
    adapters = AdapterSet(model, cfg.lora.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(f) for f in args.adapter] or [
            random_adapter(model, cfg.lora.spec(), Path(tmp) / f"a{i}", i, cfg.model.name_or_path)
            for i in range(args.adapters)]
        for i, folder in enumerate(folders):
            gc.collect()
            before = rss_anon_mib()
            modules = adapters.load_adapter(folder, f"a{i}")
            gc.collect()
            print(f"load a{i}: {len(modules)} modules, tensors {adapters.adapters[f'a{i}'].nbytes / 2**20:.2f} MiB, "
                  f"RssAnon +{rss_anon_mib() - before:.2f} MiB")
    names = list(adapters.adapters)
    cycle = iter(range(10**9))
    report(f"set_adapter (cycling {len(names)} adapters)",
           timed(lambda: adapters.set_adapter(names[next(cycle) % len(names)]), args.switches))
    report("set_adapter(None)", timed(lambda: adapters.set_adapter(None), args.switches))
    ids = torch.randint(0, 1000, (len(names) * 2, 64), generator=torch.Generator().manual_seed(0))
    adapters.set_adapter(names[0])
    with torch.no_grad():
        one = statistics.median(timed(lambda: model(input_ids=ids), 5))
        with adapters.mixed([names[i % len(names)] for i in range(len(ids))]):
            mixed = statistics.median(timed(lambda: model(input_ids=ids), 5))
    print(f"forward of {tuple(ids.shape)} tokens: one adapter {one * 1e3:.0f} ms, mixed rows {mixed * 1e3:.0f} ms "
          f"(ratio {mixed / one:.2f})")


if __name__ == "__main__":
    main()
