"""Batches: which examples go together, in which order, and how they are padded.

`ResumableBatchSampler` owns the data position: `state_dict()` is {"epoch", "index"} (the next
batch of this rank), and `load_state_dict()` makes the next iteration start exactly there. Loaders
use `num_workers=0`, so the sampler is never read ahead of the training loop. `collate` right-pads
a batch to its longest example.

Packing (`pack`) puts several documents in one row with no cross-document attention. Each packed
row carries `position_ids` that restart at 0 at every document start; transformers reads positions
that restart inside a row as packed documents (`masking_utils.find_packed_sequence_indices`) and
builds a block-diagonal causal mask (SDPA, eager, flex) or, for flash attention, varlen calls
with `cu_seqlens` (`qlora.nn.loss.packed_attention_kwargs`). A token then sees exactly what it
would see with its document alone, at the same positions, so per-token losses equal those of the
documents run one by one (tests/test_packing.py). The first token of a document gets label -100:
it is not a target of the previous document's last token.
"""

from __future__ import annotations

import random
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

Example = dict[str, list[int]]  # {"input_ids": [...], "labels": [...]} (+ "position_ids" when packed), unpadded
IGNORE = -100


class ResumableBatchSampler(Sampler[list[int]]):
    """Batches of example indices for one rank, reproducible per (seed, epoch) and resumable.

    Epoch e shuffles with seed `seed * 1_000_003 + e` (or keeps order when `shuffle=False`); with
    `group_by_length`, each shuffled mega-batch of 64 global batches is sorted by length before it
    is cut, and the batch order is shuffled again. Rank r takes global batches r, r + W, r + 2W, ...
    (W = world_size), so W ranks with one micro-batch each see what one process sees over W
    micro-batches. With `drop_uneven` the global batch count is cut to a multiple of W.

    Position: `state_dict() -> {"epoch": e, "index": i}` names the next batch to yield; iterating
    again after `load_state_dict(state)` resumes exactly there; an exhausted epoch rolls to e + 1.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True,
                 group_by_length: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_uneven: bool = True) -> None:
        self.lengths, self.batch_size, self.shuffle = list(lengths), batch_size, shuffle
        self.group_by_length, self.seed, self.rank, self.world_size = group_by_length, seed, rank, world_size
        self.drop_uneven = drop_uneven
        self.epoch, self.index = 0, 0

    def batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of epoch `epoch`."""
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            mega = self.batch_size * self.world_size * 64
            order = [i for s in range(0, len(order), mega)
                     for i in sorted(order[s: s + mega], key=lambda j: -self.lengths[j])]
        cut = [order[s: s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle:
            rng.shuffle(cut)
        if self.drop_uneven:
            cut = cut[: len(cut) // self.world_size * self.world_size]
        return cut[self.rank:: self.world_size]

    def __len__(self) -> int:
        n = -(-len(self.lengths) // self.batch_size)  # same count in every epoch
        if self.drop_uneven:
            n = n // self.world_size * self.world_size
        return len(range(self.rank, n, self.world_size))

    def _normalise(self) -> None:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0

    def __iter__(self) -> Iterator[list[int]]:
        self._normalise()
        batches = self.batches(self.epoch)
        while self.index < len(batches):
            self.index += 1
            yield batches[self.index - 1]
        self._normalise()

    def state_dict(self) -> dict[str, int]:
        self._normalise()
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def pack(examples: Sequence[Example], block: int) -> list[Example]:
    """Concatenate examples into one stream cut into `block`-token rows (the last may be shorter).

    Rows carry `position_ids`: 0, 1, ... within each document, restarting at every document start
    and at the row start, so a document cut by a row end continues in the next row as a document
    of its own (its tail trains without its head; nothing is padded or truncated). The first label
    of each document and of each row is -100: no document learns to predict the next one's start.
    """
    ids, labels, positions = [], [], []
    for ex in examples:
        ids += ex["input_ids"]
        labels += [IGNORE] + ex["labels"][1:]
        positions += range(len(ex["input_ids"]))
    rows = []
    for start in range(0, len(ids), block):
        row = positions[start: start + block]
        first_doc = next((i for i, p in enumerate(row) if p == 0), len(row))  # a continued document's tail
        rows.append({"input_ids": ids[start: start + block], "labels": [IGNORE] + labels[start + 1: start + block],
                     "position_ids": list(range(first_doc)) + row[first_doc:]})
    return rows


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids (pad_id), labels (-100), attention_mask (0 = pad).

    Packed examples (with `position_ids`) also give `position_ids`; a row's padding counts as one
    more document (positions 0, 1, ...), which no real token attends to (it comes after them).

    Also `target_positions`: the flat indices, in the (rows x (width - 1)) grid of next-token
    predictions, of the positions that have a target (label t+1 != -100). Computed here on the
    CPU, it lets the loss gather those positions with no device-to-host sync (a boolean mask
    would need one to learn its size).
    """
    width = max(len(ex["input_ids"]) for ex in batch)
    out = {"input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
           "labels": torch.full((len(batch), width), IGNORE, dtype=torch.long),
           "attention_mask": torch.zeros((len(batch), width), dtype=torch.long)}
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        out["input_ids"][row, :n] = torch.tensor(ex["input_ids"])
        out["labels"][row, :n] = torch.tensor(ex["labels"])
        out["attention_mask"][row, :n] = 1
    if "position_ids" in batch[0]:
        out["position_ids"] = torch.tensor([ex["position_ids"] + list(range(width - len(ex["position_ids"])))
                                            for ex in batch], dtype=torch.long)
    out["target_positions"] = (out["labels"][:, 1:] != IGNORE).reshape(-1).nonzero().squeeze(1)
    return out
