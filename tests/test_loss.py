"""The chunked, token-summed causal-LM loss against transformers' own loss."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from qlora.nn.loss import CausalLMLoss


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).float().eval()


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :4] = -100  # a masked prompt
    labels[mask == 0] = -100
    return ids, mask, labels


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_matches_transformers_mean_loss(model, chunk):
    ids, mask, labels = batch()
    total, n = CausalLMLoss(model, chunk)(ids, mask, labels)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert int(n) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total / n, reference, rtol=1e-5, atol=1e-6)


def test_gradients_match_transformers(model):
    ids, mask, labels = batch()
    total, n = CausalLMLoss(model, 4)(ids, mask, labels)
    grads = torch.autograd.grad(total / n, list(model.parameters()))
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_all_masked_batch_gives_zero_loss_and_no_tokens(model):
    ids, mask, labels = batch()
    total, n = CausalLMLoss(model)(ids, mask, torch.full_like(labels, -100))
    assert float(total) == 0.0 and int(n) == 0
