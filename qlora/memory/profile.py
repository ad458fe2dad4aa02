"""Measure the memory of a training run, per phase: sampled anonymous RSS and live tensor bytes.

Two views, because they answer different questions:

* **Anonymous RSS** (`RssAnon` in /proc/self/status, Linux), sampled by a thread every few ms: what
  the process really holds in private memory, including the Python interpreter, imported libraries,
  allocator caches and fragmentation. File-backed pages (the mmapped safetensors shards, shared
  libraries) are not in it; they can be dropped and re-read by the kernel, and `ru_maxrss` / VmHWM
  count them, which is why those mislead after a streamed 4-bit load. Sampling can miss a peak
  shorter than the interval.
* **Live tensor bytes** (what the planner `qlora.memory.plan` predicts): a `TorchDispatchMode` sees
  every tensor an ATen op returns, and the ledger counts each distinct storage once (views and
  in-place results share their base's storage) from its creation until it is freed (a
  `weakref.finalize` on the storage, whose Python object lives exactly as long as the C++ storage).
  This is exact at op granularity, including autograd's saved tensors and temporaries, and counts
  nothing the runtime holds outside tensors. Only tensors created while the ledger is active count:
  start it before the model is loaded. Storages that merely wrap a file mapping (safetensors'
  zero-copy tensors) are never produced by an op, so they are not counted either; anything the
  model keeps is a copy or a cast and is counted.

Attribution: every live storage is in one category. New storages start as "activations" (saved
activations, logits, gradients in flight, dequantised weights, batches: everything a step creates
and frees); the tracker re-labels storages it can identify as they become identifiable:
    weights_4bit         packed codes and quantisation constants of every `Linear4bit`
    weights_unquantised  other frozen parameters and buffers (embeddings, norms, lm_head, rotary)
    lora_params          trainable parameters
    lora_grads           `.grad` of trainable parameters (tagged by a post-accumulate-grad hook)
    optimizer_states     tensors in `optimizer.state` (tagged after each optimiser step)
The model and optimiser are found without the training loop handing them over: a global module
forward pre-hook catches the outermost module of the first forward (the loss wrapper; its
submodules hold the model), a global optimiser step post-hook catches the optimiser. Until the first
forward the weights are still "activations" (the load phase's breakdown is therefore unattributed).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights_4bit", "weights_unquantised", "lora_params", "lora_grads", "optimizer_states", "activations")
IDLE = "idle"  # the phase name outside any phase


def rss_anon_bytes(status: str | os.PathLike = "/proc/self/status") -> int:
    """Anonymous resident memory of this process in bytes (Linux `RssAnon`)."""
    with open(status, encoding="ascii") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{status} has no RssAnon line (Linux >= 4.5 needed for anonymous RSS)")


class RssSampler:
    """Samples `rss_anon_bytes()` in a daemon thread every `interval_s` until `stop()`.

    `samples` holds (seconds since start, bytes, phase at that moment, extra value) tuples; `phase`
    and `extra` are read from the callables given, so the sampler stays ignorant of what they mean.
    """

    def __init__(self, interval_s: float = 0.005, phase=lambda: IDLE, extra=lambda: 0) -> None:
        self.interval_s = interval_s
        self._phase, self._extra = phase, extra
        self.samples: list[tuple[float, int, str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.t0 = time.perf_counter()

    def start(self) -> "RssSampler":
        self.sample()
        self._thread.start()
        return self

    def sample(self) -> None:
        self.samples.append((time.perf_counter() - self.t0, rss_anon_bytes(), self._phase(), self._extra()))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def peak(self) -> int:
        return max(s[1] for s in self.samples)


@dataclass
class PhasePeak:
    """Highest live tensor bytes seen in one phase and its attribution at that moment."""

    bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)
    rss_anon: int = 0
    seconds: float = 0.0
    calls: int = 0


class TensorLedger(TorchDispatchMode):
    """Live tensor storage bytes, by category, with per-phase peaks (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list] = {}  # storage key -> [nbytes, category]
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.phase = IDLE
        self.peaks: dict[str, PhasePeak] = {}
        self._lock = threading.Lock()  # finalizers may run on the autograd thread

    # -------------------------------------------------------------------------- counting
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage())
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        with self._lock:
            self.live[key] = [nbytes, "activations"]
            self.totals["activations"] += nbytes
            self.current += nbytes
            peak = self.peaks.setdefault(self.phase, PhasePeak())
            if self.current > peak.bytes:
                peak.bytes, peak.breakdown = self.current, dict(self.totals)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        with self._lock:
            entry = self.live.pop(key, None)
            if entry is not None:
                self.totals[entry[1]] -= entry[0]
                self.current -= entry[0]

    def tag(self, tensor: torch.Tensor | None, category: str) -> None:
        """Move `tensor`'s storage to `category` (no-op for tensors created outside the ledger)."""
        if tensor is None or tensor.device.type == "meta":
            return
        with self._lock:
            entry = self.live.get(tensor.untyped_storage()._cdata)
            if entry is not None and entry[1] != category:
                self.totals[entry[1]] -= entry[0]
                self.totals[category] += entry[0]
                entry[1] = category

    # -------------------------------------------------------------------------- attribution
    def tag_model(self, model: nn.Module) -> None:
        from qlora.nn import Linear4bit

        packed = set()
        for module in model.modules():
            if isinstance(module, Linear4bit):
                packed.add(id(module.weight))
                for t in [module.weight, *quant_state_tensors(module.quant_state)]:
                    self.tag(t, "weights_4bit")
        for param in model.parameters():
            if param.requires_grad:
                self.tag(param, "lora_params")
                self.tag(param.grad, "lora_grads")
            elif id(param) not in packed:
                self.tag(param, "weights_unquantised")
        for buf in model.buffers():
            self.tag(buf, "weights_unquantised")

    def tag_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.tag(value, "optimizer_states")


def quant_state_tensors(state) -> list[torch.Tensor]:
    """The tensors a `QuantState` owns (absmax, code table, and the nested ones with double quant)."""
    if state is None:
        return []
    tensors = [state.absmax, state.code]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code, state.state2.offset]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


class MemoryTracker:
    """Per-phase memory of a run: `with tracker: train(cfg, phase=tracker.phase)`.

    Combines the RSS sampler, the tensor ledger and, on CUDA, the allocator's own peaks
    (`torch.cuda.max_memory_allocated/reserved`, reset at each phase start).
    """

    def __init__(self, interval_s: float = 0.005, cuda: bool | None = None) -> None:
        self.ledger = TensorLedger()
        self.sampler = RssSampler(interval_s, phase=lambda: self.ledger.phase, extra=lambda: self.ledger.current)
        self.cuda = torch.cuda.is_available() if cuda is None else cuda
        self.cuda_peaks: dict[str, dict[str, int]] = {}
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.batch_shapes: list[list[int]] = []
        """[batch, sequence, target tokens] of every training forward."""
        self._embed: nn.Module | None = None
        self._head: nn.Module | None = None
        self._handles: list = []
        self._stack: list[str] = []

    # -------------------------------------------------------------------------- lifetime
    def __enter__(self) -> "MemoryTracker":
        self._handles = [nn.modules.module.register_module_forward_pre_hook(self._on_forward),
                         register_optimizer_step_post_hook(self._on_step)]
        self.ledger.__enter__()
        self.sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.stop()
        self.ledger.__exit__(*exc)
        for handle in self._handles:
            handle.remove()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Context manager for `qlora.training.loop.train(phase=...)`: attributes memory to `name`."""
        self._stack.append(name)
        self.ledger.phase = name
        peak = self.ledger.peaks.setdefault(name, PhasePeak())
        peak.calls += 1
        if peak.bytes < self.ledger.current:  # what is alive on entry belongs to the phase too
            peak.bytes, peak.breakdown = self.ledger.current, dict(self.ledger.totals)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, first = time.perf_counter(), len(self.sampler.samples)
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                cuda = self.cuda_peaks.setdefault(name, {"max_allocated": 0, "max_reserved": 0})
                cuda["max_allocated"] = max(cuda["max_allocated"], torch.cuda.max_memory_allocated())
                cuda["max_reserved"] = max(cuda["max_reserved"], torch.cuda.max_memory_reserved())
            peak.seconds += time.perf_counter() - t0
            self.sampler.sample()
            rss = [s[1] for s in self.sampler.samples[first:]]
            peak.rss_anon = max([peak.rss_anon, *rss])
            self._stack.pop()
            self.ledger.phase = self._stack[-1] if self._stack else IDLE
            self._retag()

    def _retag(self) -> None:
        if self.model is not None:
            self.ledger.tag_model(self.model)
        if self.optimizer is not None:
            self.ledger.tag_optimizer(self.optimizer)

    # -------------------------------------------------------------------------- discovery hooks
    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        if self.model is None and any(True for _ in module.parameters()):
            self._adopt(module)
        if self.ledger.phase != "forward" or not args or not isinstance(args[0], torch.Tensor):
            return
        if module is self._embed and args[0].dim() == 2:
            self.batch_shapes.append([*args[0].shape, 0])
        elif module is self._head and self.batch_shapes:
            self.batch_shapes[-1][2] += args[0].shape[0] if args[0].dim() == 2 else args[0].shape[:-1].numel()

    def _adopt(self, module: nn.Module) -> None:
        """The outermost module of the first forward (the loss wrapper) owns every weight."""
        self.model = module
        self.ledger.tag_model(module)
        for p in module.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: self.ledger.tag(p.grad, "lora_grads"))
        lm = next((m for m in module.modules() if hasattr(m, "get_input_embeddings")), None)
        if lm is not None:
            self._embed, self._head = lm.get_input_embeddings(), lm.get_output_embeddings()

    def _on_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        self.optimizer = optimizer
        self.ledger.tag_optimizer(optimizer)

    # -------------------------------------------------------------------------- results
    def summary(self) -> dict:
        """Per-phase peaks (tensor bytes with attribution, RSS, CUDA) and the overall figures."""
        phases = {}
        for name, p in self.ledger.peaks.items():
            phases[name] = {"tensor_peak_bytes": p.bytes, "tensor_breakdown_at_peak": p.breakdown,
                            "rss_anon_peak_bytes": p.rss_anon, "seconds": round(p.seconds, 3), "calls": p.calls}
            if name in self.cuda_peaks:
                phases[name].update({f"cuda_{k}_bytes": v for k, v in self.cuda_peaks[name].items()})
        train_phases = [n for n in ("forward", "backward", "optimizer") if n in phases]
        step_peak = max(train_phases, key=lambda n: phases[n]["tensor_peak_bytes"], default=None)
        return {
            "phases": phases,
            "tensor_peak_bytes": max((p["tensor_peak_bytes"] for p in phases.values()), default=0),
            "train_step_tensor_peak_bytes": phases[step_peak]["tensor_peak_bytes"] if step_peak else 0,
            "train_step_peak_phase": step_peak,
            "rss_anon_peak_bytes": self.sampler.peak(),
            "rss_anon_start_bytes": self.sampler.samples[0][1],
            "batch_shapes": self.batch_shapes,
        }

    def timeline(self) -> dict[str, list]:
        s = self.sampler.samples
        return {"t_s": [round(x[0], 4) for x in s], "rss_anon_bytes": [x[1] for x in s],
                "phase": [x[2] for x in s], "tensor_bytes": [x[3] for x in s]}


# ------------------------------------------------------------------------------------------ the plan beside it

PLAN_ITEMS = {  # measured category -> the plan items it corresponds to (a MoE plan's too: qlora.memory.moe)
    "weights_4bit": ("weights_4bit", "experts_4bit"),
    "weights_unquantised": ("weights_unquantised", "routers"),
    "lora_params": ("lora_params", "expert_lora_params"),
    "lora_grads": ("lora_grads", "expert_lora_grads"),
    "optimizer_states": ("optimizer_states", "expert_lora_optimizer"),
    "activations": ("activations", "router_logits", "logits_and_loss", "layer_backward", "dequant_workspace",
                    "expert_workspace", "framework_overhead"),
}


def plan_for_recipe(cfg, device: str = "cpu", **changes):
    """The planner's `MemoryPlan` for a recipe, from the model folder's config.json (see
    `qlora.memory.from_recipe.settings_from_recipe`; `changes` override single settings)."""
    import json

    from qlora.memory.from_recipe import settings_from_recipe
    from qlora.memory.planner import plan_memory
    from qlora.hf.folder import model_folder

    config = json.loads((model_folder(cfg.model.name_or_path) / "config.json").read_text())
    return plan_memory(config, settings_from_recipe(cfg, device, **changes))


def compare_with_plan(cfg, summary: dict, device: str = "cpu") -> dict:
    """Measured train-step tensor peak beside the plan: for the recipe's worst batch (micro-batch x
    data.max_length, every token a target) and for the largest batch the run actually saw (its
    largest micro-batch, sequence length and number of loss targets, each taken separately)."""
    measured = summary["train_step_tensor_peak_bytes"]
    plans = {"recipe": plan_for_recipe(cfg, device)}
    if summary["batch_shapes"]:
        batch = max(b for b, _, _ in summary["batch_shapes"])
        seq = max(s for _, s, _ in summary["batch_shapes"])
        targets = max(n for _, _, n in summary["batch_shapes"])
        plans["largest_batch_seen"] = plan_for_recipe(cfg, device, micro_batch=batch, seq_len=seq,
                                                      target_tokens=targets if cfg.train.loss_chunk_size else None)
    out = {"measured_train_step_peak_bytes": measured}
    for name, plan in plans.items():
        out[name] = {"settings": {"micro_batch": plan.settings.micro_batch, "seq_len": plan.settings.seq_len,
                                  "target_tokens": plan.settings.target_tokens},
                     "total_bytes": plan.total_bytes, "breakdown_bytes": dict(plan.breakdown),
                     "ratio_plan_over_measured": plan.total_bytes / measured if measured else None,
                     "by_category": {cat: sum(plan.breakdown.get(i, 0) for i in items) for cat, items in PLAN_ITEMS.items()}}
    return out
