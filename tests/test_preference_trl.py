"""Preference losses, adapter gradients and reward metrics equal TRL 1.16's trainers on one batch.

Oracles (TRL 1.16, the `test` extra): `DPOTrainer.compute_loss` (sigmoid, ipo, hinge; the
reference is the base with the adapter off, or TRL's frozen "ref" copy of a pretrained adapter),
`CPOTrainer` loss_type simpo with cpo_alpha 0 (SimPO), `ORPOTrainer`, `KTOTrainer`, each on a PEFT
model holding the same LoRA weights as ours. fp32, a tiny random llama, dropout 0; our log-probs
run in chunks of 5 target tokens, so the chunking is part of what is compared.
"""

from __future__ import annotations

import pytest
import torch

from qlora import runtime
from qlora.adapters.peft_format import save_adapter
from qlora.adapters.spec import LoraSpec
from qlora.adapters.surgery import apply_lora
from qlora.config_preference import PreferenceConfig
from qlora.data.preference import collate_preference
from qlora.hf.load import load_model
from qlora.preference import PreferenceLoss
from qlora.adapters.reference import reference_for
from tiny_models import save_tiny

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

SPEC = LoraSpec(r=4, alpha=8, dropout=0.0, dtype="fp32")
RT = runtime.Runtime(torch.device("cpu"), torch.float32)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def _examples(n: int = 4, seed: int = 3, unpaired: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, 128, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    if unpaired:
        rows = [{"prompt_ids": ids(2, 6), "chosen_ids": ids(1, 7), "label": i % 3 != 0} for i in range(n)]
        for row, prev in zip(rows, rows[-1:] + rows[:-1]):
            row["kl_ids"] = prev["chosen_ids"]
        return rows
    return [{"prompt_ids": ids(2, 6), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)} for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("pref") / "base")


def _ours(base):
    torch.manual_seed(0)
    model = load_model(base, quant=None, dtype=torch.float32)
    apply_lora(model, SPEC)
    return model


def _copy_from_peft(ours, theirs) -> None:
    """Our adapter weights := the PEFT model's "default" adapter."""
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".default." in name:
                mine[name.replace("base_model.model.", "").replace(".default", "")].copy_(p)


def _perturb(theirs, seed: int = 5) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".default." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _grads(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            out[name.replace("base_model.model.", "").replace(".default", "")] = p.grad
    return out


def _trl_model(base):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def _dataset():
    import datasets

    return datasets.Dataset.from_list([{"prompt": "hello", "chosen": " world", "rejected": " you"}] * 2)


def _ours_loss(model, objective, cfg, examples, adapter=None, pad_id=0):
    loss_fn = PreferenceLoss(model, objective, cfg, reference_for(model, adapter, SPEC), chunk_size=5)
    loss_fn.train()
    batch = collate_preference(examples, pad_id)
    loss_sum, units = loss_fn(**batch)
    loss = loss_sum / units
    loss.backward()
    return float(loss), loss_fn.pop_metrics(RT, training=True)


def _compare(ours_model, theirs, ours_loss, their_loss, metrics, their_metrics, names=METRICS):
    their_loss.backward()
    assert ours_loss == pytest.approx(float(their_loss), rel=1e-5, abs=1e-6)
    mine, peers = _grads(ours_model), _grads(theirs)
    assert mine.keys() == peers.keys() and len(mine) == 2 * 7 * 2
    for name in mine:
        torch.testing.assert_close(mine[name], peers[name], rtol=1e-4, atol=1e-6)
    for name in names:
        assert metrics[name] == pytest.approx(float(their_metrics[name]), rel=1e-4, abs=1e-6), name


def _peft_trainer(base, cls, args, tok, peft_model=None):
    theirs = peft_model
    kwargs = {} if theirs is not None else {"peft_config": peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                            target_modules="all-linear")}
    trainer = cls(model=theirs if theirs is not None else _trl_model(base), args=args, train_dataset=_dataset(),
                  processing_class=tok, **kwargs)
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_equals_trl(base, tmp_path, tok, offline, loss_type):
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, loss_type=[loss_type], beta=0.3)
    trainer = _peft_trainer(base, DPOTrainer, args, tok)
    _perturb(trainer.model)
    ours = _ours(base)
    _copy_from_peft(ours, trainer.model)
    examples = _examples()
    loss, metrics = _ours_loss(ours, "dpo", PreferenceConfig(loss_type=loss_type, beta=0.3), examples)
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    their_loss = trainer.compute_loss(trainer.model, batch)
    theirs_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    _compare(ours, trainer.model, loss, their_loss, metrics, theirs_metrics)


def test_dpo_with_a_reference_adapter_equals_trl(base, tmp_path, tok, offline):
    """model.adapter: TRL copies the pretrained adapter to a frozen "ref"; ours keeps it in an AdapterSet."""
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    start = _ours(base)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(start, tmp_path / "sft", SPEC, str(base))
    theirs = peft.PeftModel.from_pretrained(_trl_model(base), tmp_path / "sft", is_trainable=True)
    args = DPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, beta=0.2)
    trainer = _peft_trainer(base, DPOTrainer, args, tok, peft_model=theirs)
    _perturb(trainer.model)  # the policy moves away from its frozen start
    ours = _ours(base)
    _copy_from_peft(ours, trainer.model)
    examples = _examples(seed=11)
    loss, metrics = _ours_loss(ours, "dpo", PreferenceConfig(beta=0.2), examples, adapter=str(tmp_path / "sft"))
    their_loss = trainer.compute_loss(trainer.model, DataCollatorForPreference(pad_token_id=0)(examples))
    theirs_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    _compare(ours, trainer.model, loss, their_loss, metrics, theirs_metrics)


def _paired_batch(examples: list[dict]) -> dict[str, torch.Tensor]:
    """TRL's CPO / ORPO batch layout: chosen_* and rejected_* tensors (labels -100 on prompt and pad)."""
    out = {}
    for key in ("chosen", "rejected"):
        rows = [ex["prompt_ids"] + ex[f"{key}_ids"] for ex in examples]
        width = max(map(len, rows))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for i, (row, ex) in enumerate(zip(rows, examples)):
            ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            labels[i, len(ex["prompt_ids"]):len(row)] = torch.tensor(ex[f"{key}_ids"])
        out.update({f"{key}_input_ids": ids, f"{key}_attention_mask": mask, f"{key}_labels": labels})
    return out


@pytest.mark.parametrize("objective", ["simpo", "orpo"])
def test_reference_free_losses_equal_trl(base, tmp_path, tok, offline, objective):
    if objective == "simpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Trainer

        extra = {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 0.7, "beta": 2.0}
        cfg = PreferenceConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.7)
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Trainer

        extra, cfg = {"beta": 0.25}, PreferenceConfig(beta=0.25)
    args = Config(output_dir=str(tmp_path), report_to=[], use_cpu=True, **extra)
    trainer = _peft_trainer(base, Trainer, args, tok)
    _perturb(trainer.model)
    ours = _ours(base)
    _copy_from_peft(ours, trainer.model)
    examples = _examples(seed=13)
    loss, metrics = _ours_loss(ours, "dpo" if objective == "simpo" else "orpo", cfg, examples)
    their_loss, theirs_metrics = trainer.get_batch_loss_metrics(trainer.model, _paired_batch(examples), "train")
    names = METRICS + (("nll_loss", "log_odds_ratio", "log_odds_chosen") if objective == "orpo" else ())
    _compare(ours, trainer.model, loss, their_loss, metrics, theirs_metrics, names)


def test_kto_equals_trl(base, tmp_path, tok, offline):
    import datasets
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    args = KTOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, beta=0.3, desirable_weight=1.5,
                     undesirable_weight=0.7, per_device_train_batch_size=2)
    rows = [{"prompt": "hello", "completion": " world", "label": True}, {"prompt": "hi", "completion": " x", "label": False}]
    theirs = _trl_model(base)
    trainer = KTOTrainer(model=theirs, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok,
                         peft_config=peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    trainer.model.train()
    _perturb(trainer.model)
    ours = _ours(base)
    _copy_from_peft(ours, trainer.model)
    examples = _examples(n=6, seed=17, unpaired=True)
    cfg = PreferenceConfig(beta=0.3, desirable_weight=1.5, undesirable_weight=0.7)
    loss, metrics = _ours_loss(ours, "kto", cfg, examples)
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(
        [{"prompt_ids": ex["prompt_ids"], "completion_ids": ex["chosen_ids"], "KL_completion_ids": ex["kl_ids"],
          "label": ex["label"]} for ex in examples])
    their_loss = trainer.compute_loss(trainer.model, batch)
    theirs_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    names = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
    _compare(ours, trainer.model, loss, their_loss, metrics, theirs_metrics, names)
