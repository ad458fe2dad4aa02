"""The QLoRA training loop: recipe in, PEFT adapter + metrics + checkpoints out.

    recipe -> runtime (device, dtype, processes) -> 4-bit model + LoRA -> data -> optimiser
           -> loop [micro-batches -> token-normalised loss -> backward] x accum -> clip -> step
           -> eval / log / checkpoint -> adapter

Gradient accumulation is normalised by tokens: each optimiser step sums the token losses of all
its micro-batches (on all processes) and divides by the total number of target tokens, so the
gradient is that of the mean token loss over the step whatever the padding or row lengths, and a
2-process run equals a 1-process run with the same global batch. DDP averages gradients over
processes, so each process scales its sum by world_size / global_tokens. Preference objectives
(`train.objective`, `qlora.preference`) normalise the same way by pairs (KTO: rows).

Resume (`resume=True`) reloads the newest checkpoint of the run folder: adapter weights, optimiser
and scheduler states, RNG states and the sampler position, so the continued run takes the same
batches with the same dropout masks as an uninterrupted one.

Evaluations (printed, logged, sample answers, the best adapter, early stopping) live in `evals`;
their best / patience state is part of every checkpoint.

Reliability lives beside the loop, not in it: `guard` (a non-finite step is skipped, too many in a
row stop the run with exit status 3, non-finite weights are never saved) and `lock` (one live run
per folder, leftovers of a killed run removed).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qlora import runtime
from qlora.adapters.hooks import training_hooks
from qlora.adapters.init import save_base
from qlora.adapters.peft_format import save_adapter
from qlora.adapters.surgery import trainable_summary
from qlora.config import RecipeConfig
from qlora.recipe import recipe_to_dict, save_recipe
from qlora.data.prompt_style import style_of_rows
from qlora.display import TrainDisplay
from qlora.data.samples import sample_prompts
from qlora.data.preference import batch_units, objective_loaders
from qlora.data.rows import Rows, load_rows
from qlora.errors import UsageError
from qlora.hf.folder import load_tokenizer
from qlora.inference.generate import before_after
from qlora.parallel import full_parameters, gradient_sync, parallelize, to_local
from qlora.run_dir import RunDir, read_metrics
from qlora.training.build import build_model, prepare_run_dir
from qlora.training.checkpoint import checkpoint_dir, load_checkpoint, load_optimizer_state, save_checkpoint
from qlora.training.evals import Evaluator
from qlora.training.guard import StepGuard, inject_nan
from qlora.training.lock import clear_run_dir, run_lock
from qlora.training.metrics import MetricsLogger, logged_throughput
from qlora.training.signals import GracefulStop
from qlora.training.trackers import tracker_names
from qlora.training.optim import build_optimizer, build_scheduler, clip_gradients
from qlora.training.optim import check_available as check_optimizer
from qlora.training.offload import activation_offload
from qlora.preference import objective_loss, precompute_reference, preference_metrics

log = logging.getLogger("qlora")


@dataclass
class Progress:
    step: int = 0  # optimiser steps done
    tokens: int = 0  # input tokens seen (all processes)


def _micro_batches(loader):
    """Endless micro-batches; the sampler rolls over to the next epoch by itself."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise UsageError("the training data produced no batches")


def no_phases(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def train(cfg: RecipeConfig, *, resume: bool = False, samples: int = 0,
          phase: Callable[[str], contextlib.AbstractContextManager] = no_phases, rows: Rows | None = None) -> dict:
    """Run the recipe; returns a summary (losses before/after, steps, tokens/s, output paths).

    The main process holds the run folder's lock throughout (a second run on it is refused).
    `phase(name)` wraps each stage in a context manager, for profilers (tools/memory_profile.py):
    "load", "forward", "backward", "optimizer", "eval", "save". `rows` are the recipe's checked
    data rows when the caller read them already (`qlora.data.rows.load_rows`).
    """
    with run_lock(Path(cfg.output.dir), enabled=runtime.process_rank() == 0), GracefulStop() as stop:
        return _train(cfg, resume, samples, phase, rows or load_rows(cfg.data), stop)


def _train(cfg: RecipeConfig, resume: bool, samples: int,
           phase: Callable[[str], contextlib.AbstractContextManager], rows: Rows, stop: GracefulStop) -> dict:
    tc = cfg.train
    rt = runtime.setup(tc.device, cfg.model.dtype, tc.threads)
    check_optimizer(cfg.optim, rt.device)  # a missing bitsandbytes is said before the model loads
    run_dir, clear_old_run, checkpoint = prepare_run_dir(cfg, resume)
    runtime.seed_everything(tc.seed)
    say = print if rt.is_main else (lambda *a, **k: None)

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code, cfg.data.chat_template)
    # Data before the model: a bad row is reported in seconds, not after a minutes-long 7B+ load.
    train_loader, eval_loader, stats = objective_loaders(tokenizer, cfg.data, tc.objective, tc.micro_batch_size,
                                                         tc.seed, rows, rank=rt.rank, world_size=rt.world_size)
    say(f"data: {stats.summary()}")
    if eval_loader is None and (tc.keep_best or tc.early_stopping_patience):
        raise UsageError("train.keep_best / train.early_stopping_patience need held-out data: set "
                         "data.eval_fraction, data.eval_size or data.eval_dataset")
    steps_per_epoch = max(1, len(train_loader) // tc.grad_accum_steps)
    total_steps = tc.max_steps or steps_per_epoch * (tc.epochs or 1)
    t_load = time.perf_counter()
    spec, base_dir = cfg.lora.spec().scheduled(total_steps), RunDir(run_dir).base
    # A base that lora.init changed is saved in the run; the adapters name it, a resume loads it.
    base_name = str(base_dir.resolve()) if spec.changes_base else cfg.model.name_or_path
    with phase("load"):
        model = build_model(cfg, rt, base_dir if resume and spec.changes_base else None)
    say(f"model: {cfg.model.name_or_path} loaded in {time.perf_counter() - t_load:.1f}s "
        f"({'4-bit ' + cfg.quant.quant_type if cfg.quant.enabled else '16-bit'}); {trainable_summary(model)}")
    hooks = training_hooks(model, spec)  # per-step work of the adapter family (AdaLoRA's ranks)
    if checkpoint is not None:  # adapter weights go in before FSDP shards them
        state = load_checkpoint(checkpoint, model, rt.rank, rt.world_size)
    loss_fn: nn.Module = objective_loss(cfg, model)  # CausalLMLoss, or a preference objective's
    if scored := precompute_reference(loss_fn, [train_loader, eval_loader], rt):
        say(f"dpo.precompute_ref: reference log-probs of {scored} examples computed")
    if rt.distributed:
        loss_fn = parallelize(loss_fn, model, tc.distributed)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)

    progress = Progress()
    if checkpoint is not None:
        load_optimizer_state(optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        train_loader.batch_sampler.load_state_dict(state["sampler"])
        runtime.set_rng_state(state["rng"])
        progress = Progress(**state["progress"])
        for hook, hook_state in zip(hooks, state.get("hooks", [])):
            hook.load_state_dict(hook_state)
        say(f"resumed from {checkpoint} at step {progress.step}")
    if rt.is_main:
        if clear_old_run:  # only now that the model and data loaded: a failed start keeps the old run
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(cfg, RunDir(run_dir).recipe)
        if spec.changes_base and checkpoint is None:
            save_base(model, base_dir, cfg.model.name_or_path)
    metrics = MetricsLogger(run_dir, tracker_names(cfg.output), recipe_to_dict(cfg), enabled=rt.is_main,
                            resume_step=progress.step)
    # FSDP layers need every process for a forward pass, so sample answers only without FSDP.
    sharded = rt.distributed and tc.distributed == "fsdp"
    k = max(samples, tc.eval_samples)
    prompts = sample_prompts(rows, k) if k and rt.is_main and not sharded else []
    style = style_of_rows(rows)  # how prompts are rendered at sample / generate time, saved with every adapter
    evaluator = Evaluator(tc, loss_fn, eval_loader, rt, metrics, model, tokenizer,
                          [p["prompt"] for p in prompts[:tc.eval_samples]], run_dir, spec, base_name,
                          say=tqdm.write if rt.is_main else say, style=style)
    if checkpoint is not None and "best" in state:
        evaluator.best.load_state_dict(state["best"])
    if checkpoint is not None and RunDir(run_dir).metrics.is_file():  # every rank: they evaluate together
        evaluator.recall(read_metrics(run_dir), progress.step)

    summary: dict = {"run_dir": str(run_dir), "total_steps": total_steps}
    if eval_loader is not None and not resume:
        with phase("eval"):
            summary["eval_before"] = evaluator(0, " (before training)")

    batches = _micro_batches(train_loader)
    offload = activation_offload(tc.offload_activations, rt.device)  # layer inputs to pinned host memory
    guard = StepGuard(tc.max_bad_steps)
    model.train()
    bar = TrainDisplay(total_steps, progress.step, steps_per_epoch, tc.log_every, enabled=rt.is_main)
    t_train, tokens_at_start = time.perf_counter(), progress.tokens
    stop.arm(run_dir)  # SIGINT / SIGTERM: finish the step, checkpoint it, exit 130 / 143
    while progress.step < total_steps and not stop.agreed:
        t0 = time.perf_counter()
        window = [next(batches) for _ in range(tc.grad_accum_steps)]  # micro-batches of this step
        local = [batch_units(b) for b in window]  # target tokens (sft), pairs / rows (preference); host batches
        in_tokens = sum(int(b["attention_mask"].numpy().sum()) for b in window)
        global_targets, global_tokens = runtime.all_reduce_sum([sum(local), in_tokens], rt)
        scale = rt.world_size / max(global_targets, 1.0)
        loss_total = torch.zeros((), device=rt.device)  # stays on the device: no sync per micro-batch
        for i, batch in enumerate(window):
            with gradient_sync(loss_fn, sync=i == len(window) - 1):
                with phase("forward"), offload:
                    loss_sum, _ = loss_fn(**{k: v.to(rt.device, non_blocking=True) for k, v in batch.items()})
                with phase("backward"):
                    (loss_sum * scale + _penalty(hooks) / len(window)).backward()
            loss_total += loss_sum.detach()
        with phase("optimizer"):
            inject_nan(optimizer, progress.step + 1)  # test hook, off unless QLORA_INJECT_NAN_STEPS is set
            grad_norm = clip_gradients(optimizer, cfg.optim.max_grad_norm)
            guard.step(optimizer, grad_norm, progress.step + 1)  # a no-op when non-finite; no host read
            step_ok, hook_metrics = True, {}
            if hooks and (step_ok := guard.resolve()):  # adapter hooks (AdaLoRA's ranks) read anyway
                for hook in hooks:
                    hook_metrics.update(hook.after_step(progress.step + 1))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        runtime.all_reduce_(loss_total, rt)
        progress.step += 1
        progress.tokens += int(global_tokens)
        bar.update(1)
        if progress.step % tc.log_every == 0 or progress.step == total_steps:  # the only host reads
            step_ok = guard.resolve()
            dt = time.perf_counter() - t0
            record = {"step": progress.step, "epoch": round(progress.step / steps_per_epoch, 4),
                      "loss": float(loss_total) / max(global_targets, 1.0), "lr": scheduler.get_last_lr()[0],
                      "tokens": progress.tokens, "step_time_s": round(dt, 4), "tokens_per_s": global_tokens / dt,
                      "grad_norm": float(grad_norm), **hook_metrics, **preference_metrics(loss_fn, rt, training=True),
                      **({} if step_ok else {"skipped": True})}
            metrics.log(record)
            bar.log(record)  # smoothed loss, lr, epoch, tokens/s, ETA
            summary["last_loss"] = record["loss"]

        if eval_loader is not None and tc.eval_every and progress.step % tc.eval_every == 0:
            with phase("eval"):
                evaluator(progress.step)
        if evaluator.should_stop:
            say(f"early stopping at step {progress.step}: {evaluator.best.bad_evals} evaluations without "
                f"a loss below {evaluator.best.best_loss:.4f} - {tc.early_stopping_threshold:g}")
            summary["stopped_early_at"] = progress.step
            break
        if stop.pending(rt) or (tc.save_every and progress.step % tc.save_every == 0):
            with phase("save"), full_parameters(loss_fn):
                if not guard.can_checkpoint(model, progress.step):
                    continue
                state = {"optimizer": to_local(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                         "sampler": train_loader.batch_sampler.state_dict(), "rng": runtime.rng_state(),
                         "progress": {"step": progress.step, "tokens": progress.tokens},
                         "hooks": [hook.state_dict() for hook in hooks], "best": evaluator.best.state_dict()}
                save_checkpoint(run_dir, progress.step, model, spec, base_name, state, rt, keep=tc.keep_checkpoints,
                                tokenizer=tokenizer, prompt_style=style)
    bar.close()
    stop.finish(progress.step, checkpoint_dir(run_dir, progress.step))
    elapsed = time.perf_counter() - t_train
    summary["train_tokens_per_s"] = (progress.tokens - tokens_at_start) / max(elapsed, 1e-9)
    if progress.tokens == tokens_at_start and rt.is_main:  # resumed at the final step: nothing trained now
        summary["train_tokens_per_s"] = logged_throughput(read_metrics(run_dir)) or 0.0
    summary["train_time_s"] = elapsed

    if rt.distributed:
        with full_parameters(loss_fn):
            summary["ranks_agree"] = _ranks_agree(model, rt)
    if eval_loader is not None:
        with phase("eval"):
            if evaluator.last_step != progress.step:
                evaluator(progress.step, " (after training)")
            summary["eval_after"] = evaluator.restore_best()
        if tc.keep_best:
            summary["best"] = {"step": evaluator.best.best_step, "eval_loss": evaluator.best.best_loss}
    with phase("save"), full_parameters(loss_fn):
        guard.check_final(model, progress.step)
        if rt.is_main:
            save_adapter(model, RunDir(run_dir).adapter, spec, base_name, tokenizer=tokenizer, prompt_style=style)
            summary["adapter"] = str(RunDir(run_dir).adapter)
    if prompts and samples:
        summary["samples"] = before_after(model, tokenizer, prompts[:samples], style=style)
    if rt.is_main:
        summary["loss_plot"] = _plot(run_dir)
    metrics.close()
    return summary


def _penalty(hooks: list) -> torch.Tensor | float:
    """The sum of the hooks' loss penalties (0 when none has one)."""
    terms = [p for hook in hooks if (p := hook.penalty()) is not None]
    return sum(terms) if terms else 0.0


def _plot(run_dir: Path) -> str | None:
    """Loss curves as run_dir/loss.png when matplotlib is installed (it is optional)."""
    from qlora.reports.plot import MatplotlibMissing, plot_loss_curves

    try:
        return str(plot_loss_curves(run_dir, RunDir(run_dir).loss_plot))
    except MatplotlibMissing:
        return None


def _ranks_agree(model: nn.Module, rt: runtime.Runtime) -> bool:
    """Check every process ends with rank 0's adapter weights (DDP keeps them in lockstep)."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters() if p.requires_grad])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    (diverged,) = runtime.all_reduce_sum([float(not torch.equal(flat, reference))], rt)
    if diverged:
        raise RuntimeError(f"{int(diverged)} process(es) ended with adapter weights that differ from rank 0's")
    return True
