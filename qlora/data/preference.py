"""Preference batches: checked preference rows -> token ids -> batches of [chosen; rejected] rows.

The rows come from the ordinary pipeline (`qlora.data.rows.load_rows`: files, `data.columns`,
mixtures, held-out split, every bad row named), in the canonical layout of
`qlora.data.preference_rows`. Here they are tokenised (TRL's DPO rules, see there) into examples
{prompt_ids, chosen_ids, rejected_ids} (pairs) or {prompt_ids, chosen_ids, label} (KTO), kept as a
list, so `dpo.precompute_ref` can store each example's reference log-probs beside its tokens.

A batch of n pairs is the 2n rows [prompt + chosen_i ; prompt + rejected_i] padded by the
supervised `collate` (labels: the completion tokens, -100 elsewhere), so one forward scores both
completions and `CausalLMLoss.sequence_logps` reads the completion log-probs of every row; `units`
= n is what the step normalises by. A KTO batch is its n rows, plus the n mismatched rows
(prompt_i + the completion of the example before i in the data set, as TRL pairs them) from
which KTO estimates its KL term.
Paired rows given to KTO are unpaired first (chosen: desirable, rejected: undesirable), as TRL does.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.data import DataLoader

from qlora.config_data import DataConfig
from qlora.data.batching import IGNORE, ResumableBatchSampler, collate
from qlora.data.loaders import _pad_id
from qlora.data.preference_rows import DESIRABLE, PAIRED, tokenize_preference
from qlora.data.rows import Rows
from qlora.data.tokenize import DataStats
from qlora.errors import UsageError

PAIRED_OBJECTIVES = ("dpo", "orpo")


def is_preference(rows: Rows) -> bool:
    return "chosen" in rows.train.column_names


def check_objective(objective: str, rows: Rows) -> None:
    """The rows fit the objective: supervised rows for sft, pairs for dpo / orpo, either for kto."""
    where = ", ".join(rows.labels)
    if objective == "sft":
        if is_preference(rows):
            raise UsageError(f"train.objective 'sft' trains on supervised rows, but {where} holds preference rows; "
                             "set train.objective to dpo, orpo or kto")
        return
    if not is_preference(rows):
        raise UsageError(f"train.objective {objective!r} needs preference rows (prompt / chosen / rejected, or "
                         f"prompt / completion / label for kto), but {where} has supervised rows (no 'rejected'); "
                         "data.format preference / unpaired-preference, data.columns maps other names")
    unpaired = any(label != PAIRED for label in rows.train["label"])
    if objective in PAIRED_OBJECTIVES and unpaired:
        raise UsageError(f"train.objective {objective!r} needs paired rows (chosen / rejected); {where} holds "
                         "unpaired rows (prompt / completion / label), which fit train.objective 'kto' only")


def _examples(ds, tokenizer, cfg: DataConfig, stats: DataStats, labels: list[str], where: str,
              unpair: bool) -> list[dict[str, Any]]:
    out = []
    for row in ds:
        example, reason, truncated = tokenize_preference(row, tokenizer, cfg.max_length)
        if example is None:
            stats.skip(f"{where}{labels[row['part']]}: {reason}", row["row"])
            continue
        stats.truncated += truncated
        if unpair and row["label"] == PAIRED:
            out += [{"prompt_ids": example["prompt_ids"], "chosen_ids": example[f"{key}_ids"], "label": key == "chosen"}
                    for key in ("chosen", "rejected")]
        elif unpair:
            out.append({"prompt_ids": example["prompt_ids"], "chosen_ids": example["chosen_ids"],
                        "label": row["label"] == DESIRABLE})
        else:
            out.append(example)
    return out


def _mismatch(examples: list[dict]) -> None:
    """KTO's KL rows: example i's prompt with example i-1's completion (`kl_ids`), as TRL builds them."""
    completions = [ex["chosen_ids"] for ex in examples]
    for ex, other in zip(examples, completions[-1:] + completions[:-1]):
        ex["kl_ids"] = other


def _length(ex: dict) -> int:
    return len(ex["prompt_ids"]) + max(len(ex["chosen_ids"]), len(ex.get("rejected_ids", ())))


def _rows(prompts: list[list[int]], completions: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"input_ids": p + c, "labels": [IGNORE] * len(p) + c} for p, c in zip(prompts, completions)]


def collate_preference(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of pairs (2n rows: chosen, then rejected) or of KTO rows (n rows + n `kl_` rows)."""
    prompts = [ex["prompt_ids"] for ex in batch]
    if "rejected_ids" in batch[0]:
        out = collate(_rows(prompts * 2, [ex["chosen_ids"] for ex in batch] + [ex["rejected_ids"] for ex in batch]),
                      pad_id)
        ref = ("ref_chosen_logps", "ref_rejected_logps")
    else:
        out = collate(_rows(prompts, [ex["chosen_ids"] for ex in batch]), pad_id)
        kl = collate(_rows(prompts, [ex["kl_ids"] for ex in batch]), pad_id)
        out.update({f"kl_{k}": v for k, v in kl.items()})
        out["desirable"] = torch.tensor([bool(ex["label"]) for ex in batch])
        ref = ("ref_logps", "ref_kl_logps")
    if ref[0] in batch[0]:  # dpo.precompute_ref
        out["ref_logps"] = torch.tensor([ex[ref[0]] for ex in batch] + [ex[ref[1]] for ex in batch])
    out["units"] = torch.ones(len(batch), dtype=torch.int8)  # one per pair / row: counted by its shape
    return out


def batch_units(batch: dict[str, torch.Tensor]) -> int:
    """What a step normalises by: pairs / KTO rows of a preference batch, else target tokens."""
    if "units" in batch:  # shapes only: never a read of a tensor's values
        return batch["units"].numel()
    if "target_positions" in batch:
        return batch["target_positions"].numel()
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def make_preference_loaders(tokenizer, cfg: DataConfig, objective: str, micro_batch_size: int, seed: int,
                            rows: Rows, *, rank: int = 0, world_size: int = 1):
    """(train loader, eval loader or None, DataStats) over the preference examples of `rows`."""
    check_objective(objective, rows)
    stats = DataStats(rows=rows.rows)
    for reason, n in rows.skips.counts.items():
        stats.skipped[reason] += n
        stats.first_skipped.setdefault(reason, rows.skips.first[reason])
    unpair = objective == "kto"
    train = _examples(rows.train, tokenizer, cfg, stats, rows.labels, "", unpair)
    evals = _examples(rows.eval, tokenizer, cfg, stats, rows.labels, "eval data: " if rows.separate_eval else "",
                      unpair)
    if not train:
        reason, row = next(iter(stats.first_skipped.items()), ("no rows", 0))
        raise UsageError(f"no usable training rows (e.g. {reason}, row {row})")
    if unpair and len({ex["label"] for ex in train}) < 2:
        kind = "desirable" if train[0]["label"] else "undesirable"
        raise UsageError(f"train.objective 'kto': every training row is {kind}; KTO needs desirable (label true) "
                         "and undesirable (label false) rows")
    if unpair:
        _mismatch(train)
        _mismatch(evals)
    stats.train_examples, stats.eval_examples = len(train), len(evals)
    stats.train_tokens = sum(map(_length, train))
    stats.eval_tokens = sum(map(_length, evals))
    stats.train_target_tokens = sum(len(ex["chosen_ids"]) + len(ex.get("rejected_ids", ())) for ex in train)
    collate_fn = functools.partial(collate_preference, pad_id=_pad_id(tokenizer))
    sampler = ResumableBatchSampler([_length(ex) for ex in train], micro_batch_size, group_by_length=cfg.group_by_length,
                                    seed=seed, rank=rank, world_size=world_size)
    if len(sampler) == 0:
        raise UsageError(f"{len(train)} training examples make fewer micro-batches than the {world_size} processes")
    train_loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0,
                              generator=torch.Generator().manual_seed(seed))
    eval_loader = None
    if evals:
        eval_sampler = ResumableBatchSampler([_length(ex) for ex in evals], micro_batch_size, shuffle=False,
                                             rank=rank, world_size=world_size, drop_uneven=False)
        eval_loader = DataLoader(evals, batch_sampler=eval_sampler, collate_fn=collate_fn, num_workers=0,
                                 generator=torch.Generator().manual_seed(seed))
    return train_loader, eval_loader, stats


def objective_loaders(tokenizer, cfg: DataConfig, objective: str, micro_batch_size: int, seed: int, rows: Rows, *,
                      rank: int = 0, world_size: int = 1):
    """The loaders of `train.objective`: supervised (`make_dataloaders`) or preference batches."""
    if objective == "sft":
        from qlora.data.loaders import make_dataloaders

        check_objective(objective, rows)
        return make_dataloaders(tokenizer, cfg, micro_batch_size, seed, rows=rows, rank=rank, world_size=world_size)
    return make_preference_loaders(tokenizer, cfg, objective, micro_batch_size, seed, rows, rank=rank,
                                   world_size=world_size)
