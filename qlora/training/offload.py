"""Activation offloading: checkpointed layers' saved inputs wait in pinned host memory, not on the GPU.

With gradient checkpointing each decoder layer keeps only its input for the backward pass
(c*h bytes per token per layer, L layers), so at long sequence lengths those inputs are what grows:
for Llama-3-70B, 80 x 8192 x 2 bytes = 1.25 MiB per token, ~15 GiB at 12k tokens. Non-reentrant
checkpointing saves a layer's input through autograd (`save_for_backward` of a no-op node), so an
outer `saved_tensors_hooks` sees exactly those tensors (the tensors saved *inside* a checkpointed
layer go through checkpointing's own, inner hooks and are recomputed anyway). Here:

    pack    (forward)  a CUDA tensor of at least `min_bytes` is copied to pinned host memory on a
                       side stream (the compute stream goes on; the source block is kept alive for
                       the copy with `record_stream`), and its GPU memory is freed when autograd
                       drops it. The same tensor saved twice (rotary tables, shared by every layer)
                       is copied once.
    unpack  (backward) the compute stream waits (on the GPU, no host sync) for that copy, then copies
                       the tensor back, just before the layer's recomputation needs it.

Trade-off: two PCIe copies of each layer input per step (T*h*c bytes each way, ~10 ms per layer for
32k tokens of a 70B model at ~50 GB/s), against ~L layer inputs of GPU memory. The copy back is not
prefetched a layer ahead (torchtune and Unsloth do), so the backward waits for it: a few percent of
a layer's backward at these sizes. Pinned host memory grows by the same ~L layer inputs.

On the CPU the activations already live in host memory: the hooks run and move nothing (a note says
so once). `copy_on_cpu=True` makes them copy anyway, which is how the tests prove on CPU that the
packed-and-restored tensors give the same gradients.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("qlora")
MIN_BYTES = 1 << 16  # smaller saved tensors (norm statistics, indices) stay where they are


class ActivationOffload:
    """A context manager: activations saved inside it are offloaded (see module docstring)."""

    def __init__(self, device: torch.device, min_bytes: int = MIN_BYTES, copy_on_cpu: bool = False) -> None:
        self.device, self.min_bytes, self.copy_on_cpu = torch.device(device), min_bytes, copy_on_cpu
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.offloaded_bytes = 0  # per forward: what left the device (for logs and tests)
        self._seen: dict[tuple, object] = {}
        self._hooks: contextlib.AbstractContextManager | None = None
        if not self.cuda and not copy_on_cpu:
            log.info("train.offload_activations: on %s the activations already live in host memory; "
                     "nothing is moved", self.device)

    def __enter__(self) -> "ActivationOffload":
        self.offloaded_bytes, self._seen = 0, {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._seen = {}  # the packed tensors live on in the graph, not here

    def _eligible(self, t: torch.Tensor) -> bool:
        moves = (self.cuda and t.is_cuda) or (self.copy_on_cpu and t.device.type == "cpu")
        return moves and not isinstance(t, torch.nn.Parameter) and t.numel() * t.element_size() >= self.min_bytes

    def pack(self, t: torch.Tensor):
        if not self._eligible(t):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t._version)
        if key not in self._seen:
            self._seen[key] = self._copy_out(t)
            self.offloaded_bytes += t.numel() * t.element_size()
        return self._seen[key]

    def _copy_out(self, t: torch.Tensor):
        if not self.cuda:
            return (t.detach().clone(), t.device, None)
        self.stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self.stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        t.record_stream(self.stream)  # the block is not reused before the copy has read it
        return (host, t.device, done)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, device, done = packed
        if done is None:
            return host
        torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=True)


def activation_offload(enabled: bool, device: torch.device) -> contextlib.AbstractContextManager:
    """An `ActivationOffload` for the training forward when `enabled`, else a no-op context."""
    return ActivationOffload(device) if enabled else contextlib.nullcontext()
