"""The training step on a GPU's terms, checked on CPU: no host read per step, fp32 optimiser states
for bf16 adapters, a skipped step that changes no bit, Linear4bit under a caller's autocast, and a
missing optimiser reported before the model loads."""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch import nn

from qlora.choices import OPTIMIZERS
from qlora.config import OptimConfig
from qlora.errors import UsageError
from qlora.nn import Linear4bit
from qlora.recipe import load_recipe
from qlora.training import loop
from qlora.training.adamw import AdamW
from qlora.training.guard import StepGuard
from qlora.training.optim import build_optimizer, check_available
from test_optim import TinyLoRA, step
from test_train import TINY


def test_adamw_is_torch_adamw_on_fp32_parameters():
    torch.manual_seed(0)
    ours, theirs = nn.Parameter(torch.randn(8, 16)), nn.Parameter(torch.randn(8, 16))
    theirs.data.copy_(ours.data)
    a = AdamW([ours], lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1, foreach=False)
    for i in range(6):
        g = torch.randn(8, 16)
        ours.grad, theirs.grad = g.clone(), g.clone()
        a.step(keep=torch.tensor(True) if i % 2 else None)
        b.step()
    # measured: at most 1 fp32 ulp apart (bias corrections in float64 on the device vs host doubles)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_skipped_step_changes_no_bit(dtype):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 16, dtype=dtype))
    opt = AdamW([p], lr=1e-2, weight_decay=0.1)
    for skip_first in (True, False):  # a skipped very first step too (step count 0)
        p.grad = torch.full_like(p, float("nan"))
        before = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
        opt.step(keep=torch.tensor(False))
        assert torch.equal(p, before[0])
        if skip_first:  # the states it created are those of "no step yet"
            assert opt.state[p]["step"].item() == 0 and not opt.state[p]["exp_avg"].any()
        else:
            assert all(torch.equal(v, before[1][k]) for k, v in opt.state[p].items())
        p.grad = torch.randn_like(p)
        opt.step(keep=torch.tensor(True))
    assert opt.state[p]["step"].item() == 2


def test_bf16_second_moment_keeps_moving():
    """Why fp32 moments: torch's bf16 `v * 0.999` rounds back to v, so v stops following the gradients."""
    torch.manual_seed(0)
    theirs = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    ours = nn.Parameter(theirs.detach().clone())
    b, a = torch.optim.AdamW([theirs], lr=1e-4), AdamW([ours], lr=1e-4)
    for _ in range(50):
        g = torch.full((64,), 1.0, dtype=torch.bfloat16)
        theirs.grad, ours.grad = g.clone(), g.clone()
        a.step(), b.step()
    for _ in range(50):  # the gradient falls 10x: v must decay towards it
        g = torch.full((64,), 0.1, dtype=torch.bfloat16)
        theirs.grad, ours.grad = g.clone(), g.clone()
        a.step(), b.step()
    v_ours, v_theirs = a.state[ours]["exp_avg_sq"], b.state[theirs]["exp_avg_sq"]
    expected = torch.tensor(0.999 ** 50 * (1 - 0.999 ** 50) + (1 - 0.999 ** 50) * 0.01)
    assert v_ours.dtype == torch.float32 and torch.allclose(v_ours, expected.expand(64), rtol=1e-4)
    assert v_theirs.dtype == torch.bfloat16 and not torch.allclose(v_theirs.float(), expected.expand(64), rtol=1e-2)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimiser_keeps_fp32_states_for_bf16_adapters(name):
    if name != "adamw":
        pytest.importorskip("bitsandbytes")
    model = TinyLoRA(dim=1024, r=8, dtype=torch.bfloat16)  # lora_A: 8192 elements (8-bit where allowed)
    optimizer = build_optimizer(model, OptimConfig(name=name))
    model(torch.randn(4, 1024)).pow(2).mean().backward()
    optimizer.step()
    for p in (model.lora_A.weight, model.lora_B.weight):
        states = [v for v in optimizer.state[p].values() if isinstance(v, torch.Tensor) and v.numel() > 1]
        assert states, name
        for v in states:  # fp32 moments, or bitsandbytes' 8-bit codes (with fp32 scales and maps)
            assert v.dtype in (torch.float32, torch.uint8), (name, v.dtype)


def test_adamw_states_stay_fp32_through_a_checkpoint():
    model = TinyLoRA(dtype=torch.bfloat16)
    opt = build_optimizer(model, OptimConfig(name="adamw"))
    step(model, opt)
    fresh = build_optimizer(model, OptimConfig(name="adamw"))
    fresh.load_state_dict(opt.state_dict())
    for p in opt.state:
        for key, value in opt.state[p].items():
            assert fresh.state[p][key].dtype == value.dtype and torch.equal(fresh.state[p][key], value), key


def test_linear4bit_under_a_callers_fp16_autocast_computes_in_its_compute_dtype():
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 64), compute_dtype=torch.bfloat16)
    x = torch.randn(16, 128, dtype=torch.bfloat16, requires_grad=True)
    plain = layer(x)
    (grad,) = torch.autograd.grad(plain.float().sum(), x)
    with torch.autocast("cpu", dtype=torch.float16):
        cast = layer(x)
        (cast_grad,) = torch.autograd.grad(cast.float().sum(), x)
    assert cast.dtype == torch.bfloat16 and torch.equal(cast, plain)
    assert cast_grad.dtype == torch.bfloat16 and torch.equal(cast_grad, grad)


def test_a_missing_bitsandbytes_is_reported_before_the_model_loads(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.cextension", None)
    with pytest.raises(UsageError, match=r"optim.name: 'paged_adamw_8bit' needs bitsandbytes.*optim.name=adamw"):
        check_available(OptimConfig(name="paged_adamw_8bit"), torch.device("cpu"))
    check_available(OptimConfig(name="adamw"), torch.device("cpu"))  # needs nothing

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the optimiser was checked")
    monkeypatch.setattr(loop, "build_model", no_load)
    cfg = load_recipe(TINY, [f"output.dir={tmp_path / 'run'}"])
    with pytest.raises(UsageError, match="needs bitsandbytes"):
        loop.train(cfg)


class HostReads:
    """Counts tensor -> Python reads (.item(), float(), int(), bool(), .tolist()) made by qlora's own
    code, between phase markers. transformers' attention-mask helper reads a padding mask per
    forward (`fast_all`, masking_utils) on any device; that one is theirs and not counted."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str]] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def read(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if "/qlora/" in caller and "/tests/" not in caller:
                self.events.append(("read", f"{name} in {caller.split('/qlora/')[-1]}"))
            return original(tensor, *args, **kwargs)
        return read

    @contextlib.contextmanager
    def phase(self, name: str):
        self.events.append(("enter", name))
        yield
        self.events.append(("exit", name))

    def in_steps(self, first: int, last: int | None) -> list[tuple[str, str]]:
        """Reads from the first forward of step `first` to the end of step `last`'s optimiser phase
        (None: to the end of the run)."""
        starts = [i for i, e in enumerate(self.events) if e == ("enter", "forward")]
        ends = [i for i, e in enumerate(self.events) if e == ("exit", "optimizer")]
        stop = None if last is None else ends[last - 1]
        return [e for e in self.events[starts[0] if first == 1 else ends[first - 2]:stop] if e[0] == "read"]


def cuda_code_path(monkeypatch, backend: str) -> None:
    """The code a CUDA run takes, on CPU tensors: a forced kernel backend, torch's dropout (the
    hashed mask is CPU-only)."""
    from qlora.nn import dropout

    monkeypatch.setenv("QLORA_BACKEND", backend)
    monkeypatch.setattr(dropout, "_native", lambda: None)


def test_no_host_read_in_a_step_that_does_not_log(monkeypatch, tmp_path):
    """4 steps logged only at the end: steps 1-3, bookkeeping included, read nothing on the host
    (the reference backend: what CUDA runs without Triton; tests/test_triton_train.py: Triton)."""
    cuda_code_path(monkeypatch, "reference")
    cfg = load_recipe(TINY, [f"output.dir={tmp_path / 'run'}", "optim.name=adamw", "train.log_every=100",
                             "train.save_every=0", "train.eval_every=0", "data.eval_size=0"])
    reads = HostReads(monkeypatch)
    loop.train(cfg, phase=reads.phase)
    assert reads.in_steps(1, 3) == []
    assert reads.in_steps(4, None)  # the logged last step does read (the loss, the guard)


def test_guard_resolves_pending_steps_at_once():
    guard = StepGuard(max_bad_steps=3)
    p = nn.Parameter(torch.ones(4))
    opt = AdamW([p], lr=0.1)
    for i, norm in enumerate([1.0, float("nan"), 2.0, float("inf")], start=1):
        p.grad = torch.full((4,), norm)
        guard.step(opt, torch.tensor(norm), i)
    assert len(guard.pending) == 4 and guard.resolve() is False
    assert guard.bad_total == 2 and guard.bad_in_a_row == 1 and not guard.pending
    assert opt.state[p]["step"].item() == 2  # only the finite steps were taken


def test_an_optimiser_without_a_device_flag_gets_zero_gradients_on_a_bad_step():
    """bitsandbytes' optimisers take no flag: a non-finite step becomes a zero-gradient step."""
    from qlora.training.guard import guarded_step

    p = nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([p], lr=0.1)
    p.grad = torch.full((4,), float("nan"))
    guarded_step(opt, torch.tensor(float("nan")))
    assert torch.equal(p.grad, torch.zeros(4)) and torch.equal(p.detach(), torch.ones(4))
    p.grad = torch.ones(4)
    guarded_step(opt, torch.tensor(2.0))
    assert torch.allclose(p.detach(), torch.full((4,), 0.9))
