"""The training loop, top to bottom: data, model, optimiser, resume, steps, evaluation, checkpoints.

Run it under torchrun for several processes (`train.nproc_per_node`): each process
encodes its share of the global batch, the embeddings are gathered, and every process
computes the loss of the whole global batch, so negatives come from all of it. Each
process back-propagates through its own share, scaled so that the averaged gradients
equal those of one process on the same global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from avse.compute import resolve_precision, retain_freed_memory, set_threads
from avse.config import Config
from avse.io import write_json
from avse.launch.signals import StopSignals, StoppedBySignal
from avse.model.avse import AVSE, build_model
from avse.progress import progress
from avse.run_info import run_name
from avse.training.curve import DIAGNOSTICS, TrainingCurve
from avse.training.distributed import DistContext, barrier, init_distributed, shutdown
from avse.training.optim import build_optimizer, lr_factor
from avse.training.resume import training_hash
from avse.training.run import Checkpoints, RunRecord, TrainingData, TrainState, model_metadata, save_tokenizer
from avse.training.seeding import Draw, seed_draws, set_deterministic
from avse.training.step import TrainingError, evaluate_split, forward_backward, optimizer_step

log = logging.getLogger("avse.train")

TRAIN_METRICS = Path("metrics/train.json")  # what the run computed: the same bits every time
SPEED_METRICS = Path("metrics/train_speed.json")  # how fast it went: differs from run to run


def train(config: Config, out_dir: Path, signals: StopSignals | None = None) -> TrainState:
    """Train; a stop signal received through `signals` (entered by the caller) ends the run at the next optimiser step
    with `last.pt` written, and `StoppedBySignal` raised."""
    signals = signals or StopSignals()
    retain_freed_memory()
    ctx = init_distributed(timedelta(minutes=config.train.dist_timeout_minutes))
    threads = set_threads(config.train.threads)
    dtype = resolve_precision(config.train.precision, ctx.device)
    train_cfg = config.train
    data = TrainingData.load(config, ctx)

    # Model and optimiser
    set_deterministic(train_cfg.deterministic, ctx.device)
    seed_draws(train_cfg.seed, Draw.INIT)  # every rank starts from the same weights
    model = build_model(config, len(data.tokenize.tokenizer)).to(ctx.device)
    data.check_caption_lengths(config, ctx, model.text_encoder.backbone.config.max_position_embeddings)
    optimizer = build_optimizer(model, train_cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)

    # Resume, tracking
    config_hash = training_hash(config, ctx.world_size, dtype, data.prepared, ctx.device)
    checkpoints = Checkpoints(out_dir, config_hash, ctx)
    state, run_id, curve = checkpoints.resume(model, optimizer, scaler)
    ddp_model = DistributedDataParallel(model) if ctx.distributed else model
    record = RunRecord(config, ctx, out_dir, config_hash, run_id, data.prepared)
    if ctx.is_main:
        save_tokenizer(data.tokenize, out_dir)
        record.write()
        record.tracker.set_tags({"threads": str(threads)})
        log.info("model: %.2fM parameters, %s precision, %d process(es) of %d thread(s), %d steps of global batch %d",
                 sum(p.numel() for p in model.parameters()) / 1e6, str(dtype).removeprefix("torch."), ctx.world_size, threads,
                 data.total_steps, data.sampler.global_batch)

    # Steps
    bar = progress(total=data.total_steps, initial=state.step, desc="train", unit="step", disable=not ctx.is_main)
    started = last_tick = time.perf_counter()
    pairs_done, data_wait = 0, 0.0
    # The micro-batches' objectives stay on the device until they are logged or checkpointed, and so does the sum of
    # an accumulation window's: reading them at once would make every step wait for the device.
    unread_losses: list[torch.Tensor] = []
    window_objective = None

    def read_losses() -> None:
        if unread_losses:
            state.add_losses(torch.stack(unread_losses).tolist(), train_cfg.log_every)
            unread_losses.clear()

    def save_last(final: bool = False) -> None:
        read_losses()  # the checkpoint holds the loss window, which a resumed run logs on from
        checkpoints.save_last(state, model, optimizer, scaler, record.run_id, curve, final=final)

    pairs_per_step = data.sampler.global_batch * train_cfg.grad_accum
    stopping = False
    model.train()
    try:
        while state.step < data.total_steps:
            data.sampler.set_epoch(state.epoch, state.batch_in_epoch)
            wait_start = time.perf_counter()
            for batch in data.loader:
                data_wait += time.perf_counter() - wait_start
                # Randomness (views, token drop, dropout) is a function of (seed, rank, batch), so a resumed run repeats it.
                seed_draws(train_cfg.seed, Draw.BATCH, ctx.rank, state.epoch, state.batch_in_epoch)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * lr_factor(state.step, data.steps_per_epoch, data.total_steps, train_cfg)
                sync = (state.batch_in_epoch + 1) % train_cfg.grad_accum == 0
                with ddp_model.no_sync() if ctx.distributed and not sync else contextlib.nullcontext():
                    objective, stop_requests = forward_backward(ddp_model, model, batch, ctx, config, state.epoch, dtype, scaler,
                                                                1 / train_cfg.grad_accum, stop=signals.requested)
                state.batch_in_epoch += 1
                unread_losses.append(objective)
                window_objective = objective if window_objective is None else window_objective + objective
                if not sync:
                    wait_start = time.perf_counter()
                    continue

                verdict = optimizer_step(model, optimizer, scaler, train_cfg.grad_clip, window_objective, stop_requests)
                if verdict.applied:
                    state.bad_in_a_row = 0
                else:
                    optimizer.zero_grad(set_to_none=True)
                    state.bad_in_a_row += 1
                    state.skipped_steps += 1
                    log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row)", state.step, state.bad_in_a_row)
                    record.tracker.log_metrics({"skipped_steps": state.skipped_steps}, state.step)
                    if state.bad_in_a_row >= train_cfg.max_bad_steps:
                        raise TrainingError(f"training stopped after {state.bad_in_a_row} consecutive steps with a non-finite loss or "
                                            f"gradients (train.max_bad_steps); {checkpoints.last_good()}")
                window_objective = None
                state.step += 1
                pairs_done += pairs_per_step
                state.pairs_seen += pairs_per_step
                now = time.perf_counter()
                state.train_seconds += now - last_tick
                last_tick, elapsed = now, now - started
                bar.update(1)
                if state.step % train_cfg.log_every == 0:
                    read_losses()
                if state.step % train_cfg.log_every == 0 and state.recent_losses:
                    bar.set_postfix(loss=f"{state.recent_loss:.3f}", pairs_s=f"{pairs_done / elapsed:.0f}", refresh=False)
                    logged = {"loss": state.recent_loss, "lr": optimizer.param_groups[-1]["lr"], "pairs_per_s": pairs_done / elapsed}
                    record.tracker.log_metrics(logged | {"data_wait_fraction": data_wait / elapsed}, state.step)
                    curve.add(state.step, state.epoch, **logged)
                if train_cfg.ckpt_every_steps and state.step % train_cfg.ckpt_every_steps == 0:
                    save_last()
                stopping = verdict.stop  # every process stops at this step: they read the same all-reduced requests
                if stopping or state.step >= data.total_steps:
                    break
                wait_start = time.perf_counter()

            if stopping:
                break
            if state.batch_in_epoch >= data.sampler.batches_per_epoch:  # the epoch is complete
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                evaluate_and_select(state, model, data, config, ctx, dtype, record, curve, checkpoints)
                save_last()
                last_tick = time.perf_counter()  # evaluation time is not training time
    except BaseException:
        record.tracker.finish("FAILED")
        raise
    finally:
        bar.close()

    if stopping:  # a checkpoint at this step boundary; the same command resumes from it
        save_last()
        record.tracker.set_tags({"avse.stopped": f"at step {state.step} by a stop signal; rerun to resume"})
        record.tracker.finish("KILLED")
        del ddp_model
        shutdown(ctx)
        by = signals.received.name if signals.received else "a stop signal to another process"
        raise StoppedBySignal(f"stopped by {by} at step {state.step} of {data.total_steps}, saved in {checkpoints.last}; "
                              "rerun the same command (or dvc repro) to resume")

    # The end
    if state.evaluated_step != state.step:  # a run that stopped mid-epoch is evaluated where it stopped
        evaluate_and_select(state, model, data, config, ctx, dtype, record, curve, checkpoints)
    save_last(final=True)
    if ctx.is_main:
        summary = {
            "steps": state.step, "epochs": state.epoch, "best_dev_rsum": state.best_rsum, "best_epoch": state.best_epoch,
            "final_loss": None if math.isnan(state.recent_loss) else round(state.recent_loss, 5),
            "skipped_steps": state.skipped_steps,
        }
        speed = {
            "train_seconds": round(state.train_seconds, 1),
            "pairs_per_s": round(state.pairs_seen / state.train_seconds, 1) if state.train_seconds else 0.0,
            "data_wait_fraction": round(data_wait / (time.perf_counter() - started), 4),
        }
        write_json(TRAIN_METRICS, summary)
        write_json(SPEED_METRICS, speed)
        curve.write()
        curve.render(title=run_name(config))
        tracker = record.tracker
        tracker.log_artifact(checkpoints.best, "checkpoints")
        model_id = tracker.log_model(out_dir, model_metadata(config, state))
        tracker.log_metrics({"train_seconds": speed["train_seconds"]}, state.step)
        tracker.log_metrics({"best_dev_rsum": state.best_rsum}, state.step, model_id=model_id, dataset=record.dev_input())
        tracker.finish()
        record.write(model_id)
        log.info("training done: %d steps, best dev rsum %.1f at epoch %d, %.0f pairs/s", state.step, state.best_rsum, state.best_epoch, speed["pairs_per_s"])
    del ddp_model  # before the process group goes (`shutdown`)
    shutdown(ctx)
    return state


def evaluate_and_select(state: TrainState, model: AVSE, data: TrainingData, config: Config, ctx: DistContext, dtype: torch.dtype,
                        record: RunRecord, curve: TrainingCurve, checkpoints: Checkpoints) -> None:
    """The dev split's recall, logged, and `best.pt` written when it is the best so far; the first process
    evaluates while the others wait (`train.dist_timeout_minutes` bounds the wait)."""
    state.evaluated_step = state.step
    if ctx.is_main:
        metrics = evaluate_split(model, data.dev_split, data.tokenize, config, ctx.device, dtype)
        record.tracker.log_metrics({f"dev_{k}": v for k, v in metrics.items()} | {"epoch": state.epoch}, state.step)
        curve.add(state.step, state.epoch, dev_rsum=metrics["rsum"], **{f"dev_{name}": metrics[name] for name in DIAGNOSTICS})
        log.info("epoch %d step %d: dev rsum %.1f (i2t R@1 %.1f, t2i R@1 %.1f); view cosine %.3f, %.2f distinct blocks a caption",
                 state.epoch, state.step, metrics["rsum"], metrics["i2t_r1"], metrics["t2i_r1"], metrics["view_cosine"], metrics["distinct_blocks"])
        if metrics["rsum"] > state.best_rsum:
            state.best_rsum, state.best_epoch = metrics["rsum"], state.epoch
            checkpoints.save_best(state, model, config, metrics, len(data.tokenize.tokenizer))
    barrier(ctx, "while the first evaluated the dev split and wrote checkpoints")
