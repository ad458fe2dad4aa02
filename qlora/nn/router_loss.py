"""The load-balancing (router auxiliary) loss of mixture-of-experts models, as transformers adds it.

Switch-Transformer style balancing: for E experts and the router's top-k choices over the batch's
(unmasked) tokens, with f_e the fraction of routing slots sent to expert e and P_e the mean router
probability of e,

    aux = E * sum_e f_e * P_e          (1 when routing is uniform)

transformers' `*ForCausalLM.forward` adds ``router_aux_loss_coef * aux`` to the loss only when
``config.output_router_logits`` is true, and that is False by default in every MoE family's config
(Mixtral, Qwen-MoE, OLMoE, Granite-MoE, Phi-MoE, gpt-oss), so a default fine-tune trains on the
language-model loss alone. qlora does the same: the trainer asks the backbone for router logits
and adds the term exactly when the model's config asks for it, through the family's own
`load_balancing_loss_func` (a family without one, e.g. DeepSeek-V3's bias-balanced router, adds
nothing). Routers are frozen in QLoRA, so the term only reaches the adapters of earlier layers,
through the hidden states the routers see. qlora's loss is a SUM of token losses normalised by the
step's token count, so the term enters as ``coef * aux * n_target_tokens`` per micro-batch: after
the normalisation each token carries ``coef * aux``, as in transformers' mean loss.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn


def balancing_function(model: nn.Module) -> Callable | None:
    """The family's `load_balancing_loss_func` when the config turns the term on, else None."""
    config = getattr(model, "config", None)
    if not getattr(config, "output_router_logits", False) or not getattr(config, "router_aux_loss_coef", 0):
        return None
    return getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)


def router_aux_loss(model: nn.Module, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``router_aux_loss_coef * aux`` for the router logits of one forward (see module docstring)."""
    config = model.config
    experts = next(getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                   if getattr(config, k, None))
    aux = balancing_function(model)(router_logits, experts, config.num_experts_per_tok, attention_mask)
    return config.router_aux_loss_coef * aux
