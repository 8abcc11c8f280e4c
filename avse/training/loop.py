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
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from avse.checkpoint import load_checkpoint, save_checkpoint
from avse.compute import autocast, resolve_precision, retain_freed_memory
from avse.config import Config
from avse.data.dataset import PairDataset, PreparedSplit
from avse.data.prepare import caption_length_report, prepared_dir
from avse.data.tokenizer import CaptionTokenizer, tokenizer_for
from avse.errors import AvseError
from avse.evaluation.embed import encode_captions, encode_images
from avse.evaluation.recall import recall_metrics
from avse.io import atomic_path, write_json
from avse.model.avse import AVSE, build_model, parameters_without_gradient
from avse.progress import progress
from avse.run_info import run_name, run_tags, split_inputs
from avse.tracking import Tracker
from avse.training.batches import Collate, GlobalBatchSampler
from avse.training.curve import CURVE_CSV, TrainingCurve
from avse.training.distributed import DistContext, all_reduce_sum, barrier, init_distributed, shutdown
from avse.training.objective import contrastive_loss
from avse.training.optim import build_optimizer, lr_factor
from avse.training.resume import training_hash
from avse.training.seeding import Draw, seed_draws, set_deterministic

log = logging.getLogger("avse.train")

TRAIN_METRICS = Path("metrics/train.json")  # what the run computed: the same bits every time
SPEED_METRICS = Path("metrics/train_speed.json")  # how fast it went: differs from run to run


class TrainingError(AvseError):
    """Training cannot go on (e.g. too many consecutive non-finite losses)."""


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0  # loader batches of `epoch` already consumed
    step: int = 0  # optimiser steps
    best_rsum: float = -1.0
    best_epoch: int = -1
    evaluated_step: int = -1  # step of the last dev evaluation (known to every rank)
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0  # summed over resumed sessions
    pairs_seen: int = 0
    recent_losses: list[float] = field(default_factory=list)  # the last `train.log_every` finite losses

    @property
    def recent_loss(self) -> float:
        return float(np.mean(self.recent_losses)) if self.recent_losses else float("nan")


def forward_backward(
    ddp_model: torch.nn.Module, model: AVSE, batch: tuple[Tensor, ...], ctx: DistContext, config: Config,
    epoch: int, dtype: torch.dtype, scaler: torch.amp.GradScaler, loss_scale: float = 1.0,
) -> tuple[float, bool]:
    """One micro-batch: forward, loss and backward. Returns (the global objective, whether it was finite)."""
    images, input_ids, attention_mask, groups = (t.to(ctx.device, non_blocking=True) for t in batch)
    with autocast(ctx.device, dtype):
        img, cap = ddp_model(images, input_ids, attention_mask)
    loss = contrastive_loss(model, img, cap, groups, ctx, config, epoch)
    # Averaged although every rank computed the same value: a kernel's last bits may differ between
    # devices, and all ranks must take the same branch below.
    objective = all_reduce_sum(loss.detach(), ctx) / ctx.world_size
    finite = bool(torch.isfinite(objective))
    if finite:
        scaler.scale(loss * loss_scale).backward()
    return float(objective), finite


def optimizer_step(model: AVSE, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float) -> bool:
    """Clip and apply the accumulated gradients; returns False (and applies nothing) if they are not finite,
    which the fp16 loss scaler also decides for the steps it skips."""
    if missing := parameters_without_gradient(model):
        # Under DistributedDataParallel the next step would stop with "Expected to have finished reduction".
        raise TrainingError(
            f"{len(missing)} trainable parameters got no gradient ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}): "
            "the model builds a part this configuration does not use without freezing it (AVSE.unused_parameters)"
        )
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    # Gradients are identical on every rank after DDP's all-reduce, so all ranks decide alike.
    if scaler.is_enabled():
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped by the scaler itself when a gradient is not finite
        scaler.update()
        applied = scaler.get_scale() >= scale  # and then, only then, it lowers its scale
    else:
        applied = bool(torch.isfinite(norm))
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return applied


def evaluate_split(model: AVSE, split: PreparedSplit, tokenize: CaptionTokenizer, config: Config, device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Recall metrics of the model on a prepared evaluation split (5 captions per image)."""
    img = encode_images(model, split, config.data.img_res, config.embed.batch_size, device, dtype, resize=config.data.resize)
    cap = encode_captions(model, split.captions, tokenize, config.embed.batch_size, device, dtype)
    with torch.no_grad():
        sims = model.similarity(img.to(device), cap.to(device), chunk_size=config.eval.chunk_size)
    return recall_metrics(sims.cpu())


def model_metadata(config: Config, state: TrainState) -> dict:
    """What a user of the logged model needs to score with it, and where it came from."""
    model = config.model
    return {"dataset": config.data.dataset, "backbone": model.vision.name, "text_backbone": model.text.name,
            "img_res": config.data.img_res, "views": model.views, "embed_size": model.embed_size, "block_dim": model.block_dim,
            "matching": model.matching, "best_dev_rsum": state.best_rsum, "best_epoch": state.best_epoch}


def train(config: Config, out_dir: Path) -> TrainState:
    retain_freed_memory()
    ctx = init_distributed(timedelta(minutes=config.train.dist_timeout_minutes))
    dtype = resolve_precision(config.train.precision, ctx.device)
    train_cfg = config.train

    # Data
    prepared = prepared_dir(config)
    tokenize = CaptionTokenizer(tokenizer_for(config.model.text.name, config.model.text.init, prepared),
                                config.model.text.max_len, config.data.caption_augment)
    train_split = PreparedSplit.load(prepared, "train")
    dev_split = PreparedSplit.load(prepared, "dev")
    dataset = PairDataset(train_split, config.data.img_res, config.data.resize, config.data.augment)
    sampler = GlobalBatchSampler(len(dataset), train_cfg.batch_size, ctx, train_cfg.seed, train_cfg.grad_accum)
    if sampler.batches_per_epoch == 0:
        raise TrainingError(
            f"train.batch_size: {train_cfg.batch_size} x {ctx.world_size} processes x {train_cfg.grad_accum} accumulation "
            f"needs more than the {len(dataset)} training captions"
        )
    loader = DataLoader(
        dataset, batch_size=train_cfg.batch_size, sampler=sampler, collate_fn=Collate(tokenize),
        num_workers=config.data.num_workers, pin_memory=ctx.device.type == "cuda",
        persistent_workers=config.data.num_workers > 0, drop_last=True,
    )
    steps_per_epoch = sampler.batches_per_epoch // train_cfg.grad_accum
    total_steps = train_cfg.epochs * steps_per_epoch
    if train_cfg.max_steps:
        total_steps = min(total_steps, train_cfg.max_steps)

    # Model and optimiser
    set_deterministic(train_cfg.deterministic, ctx.device)
    seed_draws(train_cfg.seed, Draw.INIT)  # every rank starts from the same weights
    model = build_model(config, len(tokenize.tokenizer)).to(ctx.device)
    # Rank 0 logs what model.text.max_len truncates; with no truncation, every rank checks that the captions fit alike.
    positions = model.text_encoder.backbone.config.max_position_embeddings
    for split in (train_split, dev_split) if config.model.text.max_len == 0 else (train_split,) if ctx.is_main else ():
        report = caption_length_report(split, prepared, config, tokenize.tokenizer, positions)
        if ctx.is_main and split is train_split:
            log.info(report)
    optimizer = build_optimizer(model, train_cfg)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)

    # Resume
    state, run_id = TrainState(), None
    saved_step: int | None = None  # the step last.pt holds for this run, once there is one
    config_hash = training_hash(config, ctx.world_size, dtype, prepared, ctx.device)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"
    if last_path.exists():
        checkpoint = load_checkpoint(last_path)
        if checkpoint["config_hash"] == config_hash:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            if checkpoint["scaler"]:  # empty when the run did not use fp16 loss scaling
                scaler.load_state_dict(checkpoint["scaler"])
            state = TrainState(**checkpoint["state"])
            saved_step = state.step
            run_id = checkpoint["run_id"] or None
            if not best_path.exists():  # e.g. removed by `dvc repro` before rerunning the stage
                state.best_rsum, state.evaluated_step = -1.0, -1
            if ctx.is_main:
                log.info("resuming from %s at step %d (epoch %d)", last_path, state.step, state.epoch)
        elif ctx.is_main:
            log.warning("%s was written with other parameters, data, code or process layout; starting afresh", last_path)

    ddp_model = DistributedDataParallel(model) if ctx.distributed else model
    curve = TrainingCurve.resume(CURVE_CSV, state.step)
    tracker = Tracker(config.tracking, active=ctx.is_main)
    inputs = split_inputs(config, prepared) if ctx.is_main else []  # the datasets the run reads, for the tracker
    resumed_run = run_id is not None
    run_id = tracker.start(run_id, run_name=run_name(config), params=config.flat(), tags=run_tags(config), system_metrics=True) or run_id
    if not resumed_run:
        tracker.log_inputs(inputs)

    def write_run_record(model_id: str | None = None) -> None:
        # The store may open the run only later (it was unreachable at the start): the evaluate stage reports into this id,
        # linking the test metrics to the logged model.
        write_json(out_dir / "run.json", {"run_id": tracker.run_id or run_id, "model_id": model_id, "config_hash": config_hash,
                                          "tracking_uri": config.tracking.uri, "experiment": config.tracking.experiment})
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / "tokenizer") as tmp:  # trained models carry their vocabulary
            tokenize.tokenizer.save_pretrained(tmp)
        write_run_record()
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model: %.2fM parameters, %s precision, %d process(es), %d steps of global batch %d",
                 n_params / 1e6, str(dtype).removeprefix("torch."), ctx.world_size, total_steps, sampler.global_batch)

    def save_last(final: bool = False) -> None:
        """Write last.pt; mid-run only after a good step, so that when non-finite steps stop the run,
        last.pt still holds the last good state."""
        nonlocal saved_step
        if state.bad_in_a_row and not final:
            return
        if ctx.is_main:
            curve.write()
            save_checkpoint(last_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "state": asdict(state), "config_hash": config_hash, "run_id": tracker.run_id or run_id or "",
            })
        saved_step = state.step

    def evaluate_and_select() -> None:
        state.evaluated_step = state.step
        if ctx.is_main:
            metrics = evaluate_split(model, dev_split, tokenize, config, ctx.device, dtype)
            tracker.log_metrics({f"dev_{k}": v for k, v in metrics.items()} | {"epoch": state.epoch}, state.step)
            curve.add(state.step, state.epoch, dev_rsum=metrics["rsum"])
            log.info("epoch %d step %d: dev rsum %.1f (i2t R@1 %.1f, t2i R@1 %.1f)", state.epoch, state.step, metrics["rsum"], metrics["i2t_r1"], metrics["t2i_r1"])
            if metrics["rsum"] > state.best_rsum:
                state.best_rsum, state.best_epoch = metrics["rsum"], state.epoch
                save_checkpoint(best_path, {
                    "model": model.state_dict(), "config": config.to_dict(), "config_hash": config_hash,
                    "step": state.step, "epoch": state.epoch, "dev_metrics": metrics, "vocab_size": len(tokenize.tokenizer),
                    "vision_image_size": model.image_encoder.backbone.config.image_size,
                })
        barrier(ctx, "while the first evaluated the dev split and wrote checkpoints")

    bar = progress(total=total_steps, initial=state.step, desc="train", unit="step", disable=not ctx.is_main)
    started, pairs_done, data_wait, window_finite = time.perf_counter(), 0, 0.0, True

    def run_loop() -> None:
        nonlocal pairs_done, data_wait, window_finite
        last_tick = time.perf_counter()
        model.train()
        while state.step < total_steps:
            sampler.set_epoch(state.epoch, state.batch_in_epoch)
            wait_start = time.perf_counter()
            for batch in loader:
                data_wait += time.perf_counter() - wait_start
                # Randomness (views, token drop, dropout) is a function of (seed, rank, batch), so a resumed run repeats it.
                seed_draws(train_cfg.seed, Draw.BATCH, ctx.rank, state.epoch, state.batch_in_epoch)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * lr_factor(state.step, steps_per_epoch, total_steps, train_cfg)
                sync = (state.batch_in_epoch + 1) % train_cfg.grad_accum == 0
                with ddp_model.no_sync() if ctx.distributed and not sync else contextlib.nullcontext():
                    objective, finite = forward_backward(ddp_model, model, batch, ctx, config, state.epoch, dtype, scaler, 1 / train_cfg.grad_accum)
                state.batch_in_epoch += 1
                window_finite = window_finite and finite
                if finite:
                    state.recent_losses = [*state.recent_losses, objective][-train_cfg.log_every:]
                if sync:
                    if window_finite and optimizer_step(model, optimizer, scaler, train_cfg.grad_clip):
                        state.bad_in_a_row = 0
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        state.bad_in_a_row += 1
                        state.skipped_steps += 1
                        log.warning("step %d: non-finite loss or gradients, step skipped (%d in a row)", state.step, state.bad_in_a_row)
                        tracker.log_metrics({"skipped_steps": state.skipped_steps}, state.step)
                        if state.bad_in_a_row >= train_cfg.max_bad_steps:
                            kept = f"the last good checkpoint is {last_path} (step {saved_step})" if saved_step is not None else "no checkpoint was written"
                            raise TrainingError(
                                f"training stopped after {state.bad_in_a_row} consecutive steps with a non-finite loss or "
                                f"gradients (train.max_bad_steps); {kept}"
                            )
                    window_finite = True
                    state.step += 1
                    pairs_done += sampler.global_batch * train_cfg.grad_accum
                    state.pairs_seen += sampler.global_batch * train_cfg.grad_accum
                    now = time.perf_counter()
                    state.train_seconds += now - last_tick
                    last_tick, elapsed = now, now - started
                    bar.update(1)
                    bar.set_postfix(loss=f"{objective:.3f}", pairs_s=f"{pairs_done / elapsed:.0f}", refresh=False)
                    if state.step % train_cfg.log_every == 0 and state.recent_losses:
                        logged = {"loss": state.recent_loss, "lr": optimizer.param_groups[-1]["lr"], "pairs_per_s": pairs_done / elapsed}
                        tracker.log_metrics(logged | {"data_wait_fraction": data_wait / elapsed}, state.step)
                        curve.add(state.step, state.epoch, **logged)
                    if train_cfg.ckpt_every_steps and state.step % train_cfg.ckpt_every_steps == 0:
                        save_last()
                    if state.step >= total_steps:
                        break
                wait_start = time.perf_counter()
            if state.batch_in_epoch >= sampler.batches_per_epoch:  # the epoch is complete
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                evaluate_and_select()
                save_last()
                last_tick = time.perf_counter()  # evaluation time is not training time

    try:
        run_loop()
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        bar.close()

    if state.evaluated_step != state.step:
        evaluate_and_select()  # a run that stopped mid-epoch is evaluated where it stopped
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
        tracker.log_artifact(best_path, "checkpoints")
        model_id = tracker.log_model(out_dir, model_metadata(config, state))
        dev = next((split for split in inputs if split.name == f"{config.data.dataset}-dev"), None)
        tracker.log_metrics({"train_seconds": speed["train_seconds"]}, state.step)
        tracker.log_metrics({"best_dev_rsum": state.best_rsum}, state.step, model_id=model_id, dataset=dev)
        tracker.finish()
        write_run_record(model_id)
        log.info("training done: %d steps, best dev rsum %.1f at epoch %d, %.0f pairs/s", state.step, state.best_rsum, state.best_epoch, speed["pairs_per_s"])
    shutdown(ctx)
    return state


