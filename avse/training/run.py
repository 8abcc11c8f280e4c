"""What a training run keeps besides its model and optimiser: its state, its data, its checkpoints, its record.

- `TrainState`: where training stands; saved in every checkpoint.
- `TrainingData`: the tokenizer, the train and dev splits, the global-batch sampler and the loader.
- `Checkpoints`: `last.pt` (to resume from) and `best.pt` (the best dev rsum so far).
- `RunRecord`: the MLflow run (first process only) and `models/run.json`, which later stages report into.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from avse.checkpoint import load_checkpoint, save_checkpoint
from avse.config import Config
from avse.data.dataset import PairDataset, PreparedSplit
from avse.data.prepare import caption_length_report, prepared_dir
from avse.data.tokenizer import CaptionTokenizer, tokenizer_for
from avse.io import atomic_path, write_json
from avse.launch.signals import ignore_stop_signals
from avse.model.avse import AVSE
from avse.run_info import run_name, run_tags, split_inputs
from avse.tracking import Tracker, project_root
from avse.training.batches import Collate, GlobalBatchSampler
from avse.training.curve import TrainingCurve
from avse.training.distributed import DistContext
from avse.training.step import TrainingError

log = logging.getLogger("avse.train")


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

    def add_losses(self, losses: list[float], keep: int) -> None:
        """The finite ones of the micro-batches' `losses` join the last `keep`."""
        self.recent_losses = [*self.recent_losses, *(loss for loss in losses if math.isfinite(loss))][-keep:]

    @property
    def recent_loss(self) -> float:
        return float(np.mean(self.recent_losses)) if self.recent_losses else float("nan")


@dataclass
class TrainingData:
    prepared: Path
    tokenize: CaptionTokenizer
    train_split: PreparedSplit
    dev_split: PreparedSplit
    sampler: GlobalBatchSampler
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int  # of the whole run: `train.epochs`, capped by `train.max_steps`

    @classmethod
    def load(cls, config: Config, ctx: DistContext) -> "TrainingData":
        train = config.train
        prepared = prepared_dir(config)
        tokenize = CaptionTokenizer(tokenizer_for(config.model.text.name, config.model.text.init, prepared),
                                    config.model.text.max_len, config.data.caption_augment)
        train_split, dev_split = PreparedSplit.load(prepared, "train"), PreparedSplit.load(prepared, "dev")
        dataset = PairDataset(train_split, config.data.img_res, config.data.resize, config.data.augment)
        sampler = GlobalBatchSampler(len(dataset), train.batch_size, ctx, train.seed, train.grad_accum)
        if sampler.batches_per_epoch == 0:
            raise TrainingError(
                f"train.batch_size: {train.batch_size} x {ctx.world_size} processes x {train.grad_accum} accumulation "
                f"needs more than the {len(dataset)} training captions"
            )
        loader = DataLoader(
            dataset, batch_size=train.batch_size, sampler=sampler, collate_fn=Collate(tokenize),
            num_workers=config.data.num_workers, pin_memory=ctx.device.type == "cuda",
            persistent_workers=config.data.num_workers > 0, drop_last=True, worker_init_fn=ignore_stop_signals,
        )
        steps_per_epoch = sampler.batches_per_epoch // train.grad_accum
        total_steps = train.epochs * steps_per_epoch
        if train.max_steps:
            total_steps = min(total_steps, train.max_steps)
        return cls(prepared, tokenize, train_split, dev_split, sampler, loader, steps_per_epoch, total_steps)

    def check_caption_lengths(self, config: Config, ctx: DistContext, positions: int) -> None:
        """The first process logs what `model.text.max_len` truncates; with no truncation, every process checks
        that the captions fit the text backbone's `positions` alike."""
        no_truncation = config.model.text.max_len == 0
        for split in (self.train_split, self.dev_split) if no_truncation else (self.train_split,) if ctx.is_main else ():
            report = caption_length_report(split, self.prepared, config, self.tokenize.tokenizer, positions)
            if ctx.is_main and split is self.train_split:
                log.info(report)


# In the project: the checkpoints of runs in copies of it, by training hash (`resume_location`).
RESUME_DIR = Path(".avse/resume")


def resume_location(out_dir: Path, config_hash: str) -> Path:
    """Where a run keeps the `last.pt` it resumes from: beside its models, or, for a run in a copy of the project (DVC's
    queue, a Slurm job's working copy: `project_root()` is elsewhere), in the project itself under the run's training
    hash, so that the rerun of a killed run finds it though its copy is gone."""
    project = project_root()
    if project == Path.cwd().resolve():
        return out_dir / "last.pt"
    return project / RESUME_DIR / config_hash[:16] / "last.pt"


class Checkpoints:
    """`last.pt`, written after good steps and epochs to resume from, and `best.pt`, the best dev rsum so far.

    Only the first process writes; every process resumes from the same `last.pt`. A run in a copy of the project keeps
    it in the project while it trains (`resume_location`) and leaves it beside its models when it ends.
    """

    def __init__(self, out_dir: Path, config_hash: str, ctx: DistContext):
        self.last, self.best = resume_location(out_dir, config_hash), out_dir / "best.pt"
        self.finished = out_dir / "last.pt"
        self.config_hash, self.ctx = config_hash, ctx
        self.saved_step: int | None = None  # the step last.pt holds for this run, once there is one

    def resume(self, model: AVSE, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> tuple[TrainState, str | None, TrainingCurve]:
        """The state, MLflow run id and training curve of `last.pt`, loaded into the model and optimiser, if it was
        written by this run's parameters, data, code and layout; else a fresh state."""
        if not self.last.exists():
            return TrainState(), None, TrainingCurve()
        checkpoint = load_checkpoint(self.last)
        if checkpoint["config_hash"] != self.config_hash:
            if self.ctx.is_main:
                log.warning("%s was written with other parameters, data, code or process layout; starting afresh", self.last)
            return TrainState(), None, TrainingCurve()
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"]:  # empty when the run did not use fp16 loss scaling
            scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState(**checkpoint["state"])
        self.saved_step = state.step
        if not self.best.exists():  # e.g. removed by `dvc repro` before rerunning the stage
            state.best_rsum, state.evaluated_step = -1.0, -1
        if self.ctx.is_main:
            log.info("resuming from %s at step %d (epoch %d)", self.last, state.step, state.epoch)
        return state, checkpoint["run_id"] or None, TrainingCurve(checkpoint["curve"])

    def save_last(self, state: TrainState, model: AVSE, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                  run_id: str | None, curve: TrainingCurve, final: bool = False) -> None:
        """Mid-run only after a good step, so that when non-finite steps stop the run, last.pt holds the last good state.
        It holds the training curve, written beside it, so that a resumed run continues the curve."""
        if state.bad_in_a_row and not final:
            return
        if self.ctx.is_main:
            curve.write()
            save_checkpoint(self.last, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "state": asdict(state), "config_hash": self.config_hash, "run_id": run_id or "", "curve": curve.rows,
            })
            if final and self.last != self.finished:  # the copy's output; nothing is left to resume in the project
                os.replace(self.last, self.finished)
                self.last.parent.rmdir()
        self.saved_step = state.step

    def save_best(self, state: TrainState, model: AVSE, config: Config, metrics: dict[str, float], vocab_size: int) -> None:
        save_checkpoint(self.best, {
            "model": model.state_dict(), "config": config.to_dict(), "config_hash": self.config_hash,
            "step": state.step, "epoch": state.epoch, "dev_metrics": metrics, "vocab_size": vocab_size,
            "vision_image_size": model.image_encoder.backbone.config.image_size,
        })

    def last_good(self) -> str:
        """Where a stopped run can be picked up, in words."""
        return f"the last good checkpoint is {self.last} (step {self.saved_step})" if self.saved_step is not None else "no checkpoint was written"


class RunRecord:
    """The run's MLflow run (the first process talks to MLflow) and `run.json` beside the checkpoints.

    The store may open the run only later (it was unreachable at the start); the evaluate stage reports
    into the id in `run.json`, linking the test metrics to the logged model.
    """

    def __init__(self, config: Config, ctx: DistContext, out_dir: Path, config_hash: str, run_id: str | None, prepared: Path):
        self.config, self.out_dir, self.config_hash = config, out_dir, config_hash
        self.tracker = Tracker(config.tracking, active=ctx.is_main)
        self.inputs = split_inputs(config, prepared) if ctx.is_main else []  # the datasets the run reads
        started = self.tracker.start(run_id, run_name=run_name(config), params=config.flat(), tags=run_tags(config), system_metrics=True)
        if run_id is None:
            self.tracker.log_inputs(self.inputs)
        self._run_id = started or run_id

    @property
    def run_id(self) -> str | None:
        return self.tracker.run_id or self._run_id

    def write(self, model_id: str | None = None) -> None:
        write_json(self.out_dir / "run.json", {"run_id": self.run_id, "model_id": model_id, "config_hash": self.config_hash,
                                               "tracking_uri": self.config.tracking.uri, "experiment": self.config.tracking.experiment})

    def dev_input(self):
        """The dev split as the tracker's dataset input, for metrics measured on it."""
        return next((split for split in self.inputs if split.name == f"{self.config.data.dataset}-dev"), None)


def save_tokenizer(tokenize: CaptionTokenizer, out_dir: Path) -> None:
    """Trained models carry their vocabulary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "tokenizer") as tmp:
        tokenize.tokenizer.save_pretrained(tmp)


def model_metadata(config: Config, state: TrainState) -> dict:
    """What a user of the logged model needs to score with it, and where it came from."""
    model = config.model
    return {"dataset": config.data.dataset, "backbone": model.vision.name, "text_backbone": model.text.name,
            "img_res": config.data.img_res, "views": model.views, "embed_size": model.embed_size, "block_dim": model.block_dim,
            "matching": model.matching, "best_dev_rsum": state.best_rsum, "best_epoch": state.best_epoch}
