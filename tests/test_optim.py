"""Optimisers (groups, LoRA+, every name steps, CPU paging fallback) and learning-rate schedules."""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from torch import nn

from qlora.config import OptimConfig
from qlora.choices import OPTIMIZERS
from qlora.errors import UsageError
from qlora.nn import LoRALinear
from qlora.training.optim import LRMultiplier, build_optimizer, build_scheduler, clip_gradients, param_groups


class TinyLoRA(nn.Module):
    """A LoRALinear around a frozen linear (scaling 1), plus a trainable norm outside any adapter:
    the optimiser sees Role.A, Role.B and an ordinary trainable parameter."""

    def __init__(self, dim: int = 96, r: int = 8, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lora = LoRALinear(nn.Linear(dim, dim), r=r, alpha=r, dtype=dtype)
        nn.init.normal_(self.lora.lora_B.weight, std=0.02)  # non-zero so A gets gradients too
        self.norm = nn.LayerNorm(dim)
        self.lora_A, self.lora_B = self.lora.lora_A, self.lora.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lora(x).float())


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch.manual_seed(0)
    loss = model(torch.randn(4, 96)).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_groups_lora_plus_and_weight_decay():
    cfg = OptimConfig(lr=1e-3, lora_plus_ratio=16.0, weight_decay=0.1)
    model = TinyLoRA()
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["lora"]["params"] == [model.lora_A.weight] and groups["lora"]["lr"] == 1e-3
    assert groups["lora_B"]["params"] == [model.lora_B.weight] and groups["lora_B"]["lr"] == pytest.approx(1.6e-2)
    assert groups["lora"]["weight_decay"] == groups["lora_B"]["weight_decay"] == 0.1
    assert groups["no_decay"]["params"] == [model.norm.weight, model.norm.bias]  # frozen base left out
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lr"] == 1e-3


def test_lora_plus_scales_the_first_adam_update_of_b():
    # Adam's first update is lr * m / (sqrt(v) + eps) = lr * g / |g| (bias-corrected): each entry
    # moves by its group's lr (up to rounding where |g| is ~1e-8), so the ratio shows up directly.
    torch.manual_seed(0)
    model = TinyLoRA()
    a0, b0 = model.lora_A.weight.detach().clone(), model.lora_B.weight.detach().clone()
    step(model, build_optimizer(model, OptimConfig(name="adamw", lr=1e-3, lora_plus_ratio=4.0, eps=1e-12)))
    assert (model.lora_A.weight - a0).abs().median().item() == pytest.approx(1e-3, rel=1e-4)
    assert (model.lora_B.weight - b0).abs().median().item() == pytest.approx(4e-3, rel=1e-4)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_optimiser_steps_on_cpu(name: str, dtype: torch.dtype, caplog):
    model = TinyLoRA(dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with caplog.at_level(logging.WARNING, logger="qlora.training.optim"), warnings.catch_warnings():
        warnings.simplefilter("error")  # bitsandbytes' own per-optimiser paging warning must not fire
        optimizer = build_optimizer(model, OptimConfig(name=name, lr=1e-2, weight_decay=0.01))
        for _ in range(3):
            step(model, optimizer)
    expected = {"paged_adamw_8bit": "AdamW8bit", "adamw_8bit": "AdamW8bit",
                "paged_adamw_32bit": "AdamW32bit", "adamw": "AdamW"}[name]
    assert type(optimizer).__name__ == expected
    paging_notes = [r for r in caplog.records if "un-paged" in r.getMessage()]
    assert len(paging_notes) == (1 if name.startswith("paged") else 0)  # said once, not per step
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == p.requires_grad, n
    if name.endswith("8bit"):  # LoRA A (768 elements) is below bnb's 4096 minimum: fp32 state
        state = optimizer.state[model.lora_A.weight]
        assert state["state1"].dtype == torch.float32


def test_8bit_state_for_large_matrices():
    model = TinyLoRA(dim=1024, r=8)  # A: 8 x 1024 = 8192 elements >= 4096 -> uint8 moments
    optimizer = build_optimizer(model, OptimConfig(name="adamw_8bit"))
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    assert optimizer.state[model.lora_A.weight]["state1"].dtype == torch.uint8


def test_every_configured_name_has_an_optimiser():
    from qlora.training import optim

    assert set(optim._BNB_CLASSES) == set(OPTIMIZERS)


def test_no_trainable_parameters_and_unknown_name():
    with pytest.raises(UsageError, match="no trainable parameters"):
        build_optimizer(nn.Linear(4, 4).requires_grad_(False), OptimConfig())
    with pytest.raises(UsageError, match=r"optim.name: 'sgd'.*paged_adamw_8bit"):
        OptimConfig(name="sgd")
    cfg = OptimConfig()
    cfg.name = "sgd"  # bypassing the config checks still gives a clear error
    with pytest.raises(UsageError, match=r"optim.name: 'sgd'"):
        build_optimizer(TinyLoRA(), cfg)


@pytest.mark.parametrize("kind, at_60, at_end", [("cosine", 0.5, 0.0), ("linear", 0.5, 0.0), ("constant", 1.0, 1.0)])
def test_schedule_values(kind: str, at_60: float, at_end: float):
    f = LRMultiplier(warmup_steps=10, total_steps=110, kind=kind)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])  # (s + 1) / W
    assert f(10) == 1.0  # decay starts from full lr
    assert f(60) == pytest.approx(at_60)  # halfway through the 100 decay steps
    assert f(110) == pytest.approx(at_end) and f(500) == pytest.approx(at_end)
    assert LRMultiplier(0, 100, "cosine")(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert LRMultiplier(0, 100, kind, min_ratio=0.1)(100) == pytest.approx(0.1 + 0.9 * at_end)


def test_scheduler_drives_every_group_and_round_trips():
    model = TinyLoRA()
    cfg = OptimConfig(name="adamw", lr=1e-3, lora_plus_ratio=2.0, warmup_ratio=0.03, scheduler="cosine")
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps=1875)
    assert scheduler.lr_lambdas[0].warmup_steps == 57  # ceil(0.03 * 1875), the paper's warmup
    for _ in range(100):
        step(model, optimizer)
        scheduler.step()
    factor = LRMultiplier(57, 1875, "cosine")(100)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * factor, 2e-3 * factor, 1e-3 * factor])
    fresh = build_scheduler(build_optimizer(model, cfg), OptimConfig(name="adamw", lr=1e-3), total_steps=5)
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.last_epoch == 100 and fresh.lr_lambdas[0] == scheduler.lr_lambdas[0]
    with pytest.raises(UsageError, match="0 optimiser steps"):
        build_scheduler(optimizer, cfg, total_steps=0)


def test_clip_gradients():
    model = TinyLoRA()
    optimizer = build_optimizer(model, OptimConfig(name="adamw"))
    (model(torch.randn(4, 96)).sum() * 1e3).backward()
    norm = float(clip_gradients(optimizer, None))
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    assert norm == pytest.approx(float(total), rel=1e-5) and norm > 1.0
    assert float(clip_gradients(optimizer, 1.0)) == pytest.approx(norm, rel=1e-5)
    assert float(clip_gradients(optimizer, 1.0)) == pytest.approx(1.0, rel=1e-4)  # now clipped
