"""Activation offloading (qlora.training.offload): the same gradients with it on and off, through the
hooks a CUDA run uses (on CPU they are made to copy), and the planner's long-context figures."""

from __future__ import annotations

import logging

import pytest
import torch

from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora, prepare_for_training
from qlora.hf.load import load_model
from qlora.nn.loss import CausalLMLoss
from qlora.training.offload import ActivationOffload, activation_offload
from tiny_models import randomise_lora_b, save_tiny, tokens


def grads(model, offload) -> dict[str, torch.Tensor]:
    ids = tokens(n=2, length=48)
    model.zero_grad(set_to_none=True)
    with offload:
        total, n = CausalLMLoss(model)(ids, torch.ones_like(ids), ids)
    (total / n).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = save_tiny("llama", tmp_path_factory.mktemp("tiny") / "m")
    m = load_model(folder)
    apply_lora(m, LoraSpec(r=4, alpha=8))
    randomise_lora_b(m)
    return prepare_for_training(m, gradient_checkpointing=True).train()


def test_gradients_equal_with_offloading_on_and_off(model):
    plain = grads(model, activation_offload(False, torch.device("cpu")))
    hooks = ActivationOffload(torch.device("cpu"), min_bytes=1024, copy_on_cpu=True)
    offloaded = grads(model, hooks)
    # the checkpointed layers' inputs (2 x 48 x 64 bf16 = 12 KiB each) went through pack / unpack
    assert hooks.offloaded_bytes >= 2 * 2 * 48 * 64
    assert plain.keys() == offloaded.keys() and plain
    for name in plain:
        assert torch.equal(plain[name], offloaded[name]), name


def test_on_cpu_it_moves_nothing_and_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="qlora"):
        hooks = ActivationOffload(torch.device("cpu"))
    assert "already live in host memory" in caplog.text
    x = torch.randn(1 << 16, requires_grad=True)
    with hooks:
        y = (x * x).sum()
    y.backward()
    assert hooks.offloaded_bytes == 0 and torch.equal(x.grad, 2 * x)


def test_a_tensor_saved_twice_is_copied_once():
    hooks = ActivationOffload(torch.device("cpu"), min_bytes=0, copy_on_cpu=True)
    x = torch.randn(256, requires_grad=True)
    shared = torch.randn(256)
    with hooks:
        y = (x * shared).sum() + (x * shared * 2).sum()
    y.backward()
    assert hooks.offloaded_bytes == 256 * 4  # both products save `shared` (x's gradient needs it): one copy
    assert torch.equal(x.grad, shared * 3)


def test_the_planner_counts_two_layer_inputs_with_offloading():
    from dataclasses import replace

    from qlora.memory import PlanSettings, model_shape, plan_memory

    shape, s = model_shape("llama3-70b"), PlanSettings(lora_r=32, seq_len=8192, micro_batch=1)
    on, off = plan_memory(shape, replace(s, offload_activations=True)), plan_memory(shape, s)
    layer_input = 2 * 8192 * shape.hidden_size  # bf16, one layer's input for 8192 tokens
    assert off.breakdown["activations"] - on.breakdown["activations"] == (shape.num_hidden_layers - 2) * layer_input
    assert {k: v for k, v in on.breakdown.items() if k != "activations"} == \
        {k: v for k, v in off.breakdown.items() if k != "activations"}


def test_longest_sequence_with_and_without_offloading(capsys):
    from qlora.cli import main
    from qlora.memory import GIB, PlanSettings, model_shape, plan_memory
    from qlora.memory.long_context import longest_seq_len

    shape, s = model_shape("llama3-70b"), PlanSettings(lora_r=32, micro_batch=1)
    gpu = 48 * GIB
    without, with_ = longest_seq_len(shape, s, gpu), longest_seq_len(shape, PlanSettings(lora_r=32, offload_activations=True), gpu)
    assert 0 < without < with_
    for seq, offload in ((without, False), (with_, True)):  # the boundary, exactly
        fits = [plan_memory(shape, PlanSettings(lora_r=32, seq_len=n, offload_activations=offload)).fits(gpu)
                for n in (seq, seq + 1)]
        assert fits == [True, False]
    assert main(["memory", "llama3-70b", "--gpu-gb", "48", "--lora-r", "32", "--max-seq-len"]) == 0
    out = capsys.readouterr().out
    assert f"without offloading: {without:,} tokens" in out and f"with activation offloading: {with_:,} tokens" in out
