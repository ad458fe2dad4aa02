"""Packing without cross-document attention (`qlora.data.batching.pack` + `qlora.nn.loss.CausalLMLoss`).

The property: a packed batch gives each token the loss it has when its document runs alone. Tiny
random models of several families in fp32, built in-process; tolerance 1e-4 on losses around 5
(fp32 attention over different row lengths sums in a different order).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora.data.batching import collate, pack
from qlora.nn.loss import CausalLMLoss, packed_attention_kwargs
from tiny_models import tiny_config

LENGTHS = (5, 6, 4, 7, 9)  # block 16: row 0 = docs 0-2 + doc 3's first token, row 1 = doc 3's tail + doc 4


def _documents(seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in LENGTHS:
        ids = torch.randint(2, 128, (n,), generator=g).tolist()
        docs.append({"input_ids": ids, "labels": list(ids)})  # every token trained (train_on_prompt)
    return docs


def _model(family: str, attention: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), attn_implementation=attention)
    with torch.no_grad():  # larger than the 0.02 init, so attention patterns matter to the loss
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model.float().eval()


def _token_losses(loss_fn: CausalLMLoss, batch: dict, packed: bool = True) -> torch.Tensor:
    """(rows, T - 1) cross entropy of each next-token prediction, NaN where there is no target."""
    hidden = loss_fn.hidden_states(batch["input_ids"], batch["attention_mask"],
                                   batch.get("position_ids") if packed else None)
    logits = loss_fn.model.get_output_embeddings()(hidden[:, :-1]).float()
    targets = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    return ce.masked_fill(targets == -100, float("nan"))


def _pieces(row: dict) -> list[tuple[int, int]]:
    """(start, end) of each document piece of a packed row: positions restart at 0."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    return list(zip(starts, starts[1:] + [len(row["input_ids"])]))


def test_pack_restarts_positions_and_masks_document_starts():
    docs = _documents()
    rows = pack(docs, 16)
    assert [len(r["input_ids"]) for r in rows] == [16, 15]
    assert sum((r["input_ids"] for r in rows), []) == sum((d["input_ids"] for d in docs), [])
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0]
    assert rows[1]["position_ids"] == list(range(6)) + list(range(9))  # doc 3's tail restarts at the row
    for row in rows:  # no document start is the target of the previous document's last token
        assert all(row["labels"][i] == -100 for i, p in enumerate(row["position_ids"]) if p == 0)
        assert sum(label != -100 for label in row["labels"]) == len(row["labels"]) - len(_pieces(row))
    batch = collate(rows, pad_id=0)
    assert batch["position_ids"][1].tolist() == rows[1]["position_ids"] + [0]  # the pad is its own piece
    assert batch["attention_mask"].sum() == 31


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gpt2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_equal_documents_run_one_by_one(family, attention):
    loss_fn = CausalLMLoss(_model(family, attention))
    rows = pack(_documents(), 16)
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        packed = _token_losses(loss_fn, batch)
        total, count = loss_fn(**batch)
        alone_total = 0.0
        for r, row in enumerate(rows):
            for start, end in _pieces(row):
                piece = {k: [v[start:end]] for k, v in row.items() if k != "position_ids"}
                alone = collate([{k: v[0] for k, v in piece.items()}], pad_id=0)
                expected = _token_losses(loss_fn, alone)[0]  # predictions of tokens start+1 .. end-1
                torch.testing.assert_close(packed[r, start: end - 1], expected, atol=1e-4, rtol=0, equal_nan=True)
                alone_total += float(expected.nansum())
    assert int(count) == int((~packed.isnan()).sum()) == 31 - 6  # 6 pieces, each loses its first target
    assert float(total) == pytest.approx(alone_total, abs=1e-3)


def test_cross_attending_packing_fails_the_equivalence():
    """The old packing (one causal mask over the whole row, positions not reset) changes the losses
    of every document after the first in a row: the check above would catch it."""
    loss_fn = CausalLMLoss(_model("llama", "sdpa"))
    rows = pack(_documents(), 16)
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        packed = _token_losses(loss_fn, batch)
        crossed = _token_losses(loss_fn, batch, packed=False)
    first_piece = slice(0, 4)  # row 0's first document: the same either way
    torch.testing.assert_close(crossed[0, first_piece], packed[0, first_piece], atol=1e-4, rtol=0, equal_nan=True)
    assert float((crossed[0, 5:] - packed[0, 5:]).abs().nan_to_num().max()) > 0.05


def test_flash_attention_gets_varlen_kwargs_over_the_flattened_batch():
    position_ids = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]])
    kwargs = packed_attention_kwargs(position_ids, "flash_attention_2")
    assert kwargs["cu_seq_lens_q"].tolist() == [0, 3, 5, 9, 10] and kwargs["cu_seq_lens_q"].dtype == torch.int32
    assert kwargs["max_length_q"] == kwargs["max_length_k"] == 4
    assert packed_attention_kwargs(position_ids, "sdpa") == {}  # SDPA / eager: transformers builds the mask


def _varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A flash-attention stand-in: causal attention within each [cu[i], cu[i+1]) of the flattened
    (b*T) tokens, as `flash_attn_varlen_func` computes; it fails if the varlen kwargs do not arrive."""
    from transformers.integrations.sdpa_attention import repeat_kv

    cu = kwargs["cu_seq_lens_q"].tolist()
    assert attention_mask is None and kwargs["max_length_q"] == max(b - a for a, b in zip(cu, cu[1:]))
    b, heads, T, d = query.shape
    key, value = (repeat_kv(t, heads // t.shape[1]) for t in (key, value))
    q, k, v = (t.transpose(1, 2).reshape(b * T, heads, d).transpose(0, 1) for t in (query, key, value))
    out = torch.cat([F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scaling)
                     for s, e in zip(cu, cu[1:])], dim=1)
    return out.transpose(0, 1).reshape(b, T, heads, d), None


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_varlen_kwargs_reach_every_layer_and_match_documents_alone(family, monkeypatch):
    """The GPU path's CPU twin: a registered attention that takes the varlen kwargs (as flash
    attention does; transformers reserves "flash..." names for real kernels, hence the prefix
    patched here) gets them in every layer, no mask, and the losses equal the documents alone."""
    from transformers import AttentionInterface

    import qlora.nn.loss

    monkeypatch.setattr(qlora.nn.loss, "FLASH_PREFIX", "varlen_")
    AttentionInterface.register("varlen_reference", _varlen_reference)
    packed_fn = CausalLMLoss(_model(family, "varlen_reference"))
    alone_fn = CausalLMLoss(_model(family, "sdpa"))
    rows = pack(_documents(), 16)
    batch = collate(rows, pad_id=0)
    with torch.no_grad():
        packed = _token_losses(packed_fn, batch)
        for r, row in enumerate(rows):
            for start, end in _pieces(row):
                alone = collate([{k: row[k][start:end] for k in ("input_ids", "labels")}], pad_id=0)
                torch.testing.assert_close(packed[r, start: end - 1], _token_losses(alone_fn, alone)[0],
                                           atol=1e-4, rtol=0, equal_nan=True)
