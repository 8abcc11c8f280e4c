"""The pipeline's stages as functions of the validated config: what `stages/*.py` and the `avse` command run."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from functools import partial
from pathlib import Path
from typing import Iterator

from avse.config import Config
from avse.errors import AvseError, ConfigError, Interrupted
from avse.io import atomic_path, atomic_paths, json_text, writer_lock
from avse.launch.signals import STOP_SIGNALS, StopSignals

log = logging.getLogger("avse")

SYNTHETIC_CAPTIONS = Path("data/synthetic")
SYNTHETIC_IMAGES = Path("data/synthetic-images")
MODELS = Path("models")
EMBEDDINGS = Path("embeddings")
EVAL_METRICS = Path("metrics/eval.json")
RECALL_CURVE = Path("metrics/recall_curve.csv")
RECALL_PLOT = Path("metrics/recall_curve.png")
EVAL_OUTPUTS = Path("outputs/eval")


@contextlib.contextmanager
def _writing(output: Path) -> Iterator[None]:
    """A stage other than train at work on `output`: its one writer (`writer_lock`), which a stop signal ends with one
    line, its temporaries removed on the way out (training turns a stop signal into a checkpoint instead)."""

    def interrupt(signum: int, frame) -> None:
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_DFL)  # a second signal ends the process at once
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}; no output was left half-written")

    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    previous = {signum: signal.signal(signum, interrupt) for signum in STOP_SIGNALS} if in_main_thread else {}
    try:
        with writer_lock(output):
            yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def synthesize(config: Config) -> None:
    """Generate the embedded synthetic dataset in the caption-split layout."""
    from avse.data.synthetic import generate_dataset

    spec = config.data.synthetic
    with _writing(SYNTHETIC_CAPTIONS):
        generate_dataset(
            SYNTHETIC_CAPTIONS,
            SYNTHETIC_IMAGES,
            seed=spec.seed,
            image_size=spec.image_size,
            split_sizes={"train": spec.train_images, "dev": spec.dev_images, "test": spec.test_images},
            min_objects=spec.min_objects,
            max_objects=spec.max_objects,
        )
    log.info("synthetic dataset written to %s and %s", SYNTHETIC_CAPTIONS, SYNTHETIC_IMAGES)


def prepare(config: Config) -> None:
    """Validate the raw dataset and write `data/prepared/<dataset>/`."""
    from avse.data.prepare import prepare as prepare_dataset, prepared_dir
    from avse.data.tokenizer import train_wordpiece

    builder = None
    if config.model.text.init == "random":
        builder = partial(train_wordpiece, vocab_size=config.data.vocab_size)
    out = prepared_dir(config)
    with _writing(out):
        stats = prepare_dataset(config, out, tokenizer_builder=builder)
    for split, s in stats.items():
        if isinstance(s, dict):
            log.info("%-8s %6d images %7d captions, %.1f words per caption", split, s["images"], s["captions"], s["words_per_caption"]["mean"])
    log.info("prepared dataset written to %s", out)


def train(config: Config, signals: StopSignals) -> None:
    """Train with `train.nproc_per_node` processes; writes `models/` and `metrics/train.json`. A stop signal that
    `signals` (entered by the caller) received ends the run at the next step with a checkpoint."""
    from avse.training.loop import train as train_loop

    train_loop(config, MODELS, signals)


def embed(config: Config) -> None:
    """Encode every image and caption of `embed.split` once with `models/best.pt`; writes `embeddings/<split>/`."""
    with _writing(EMBEDDINGS / config.embed.split):
        _embed(config)


def _embed(config: Config) -> None:
    import time

    import torch

    from avse.compute import resolve_precision, retain_freed_memory
    from avse.data.dataset import PreparedSplit, check_image_cache
    from avse.data.prepare import prepared_dir
    from avse.evaluation.embed import encode_captions, encode_images, load_trained
    from avse.checkpoint import save_tensors

    retain_freed_memory()

    model, trained, tokenize, checkpoint = load_trained(MODELS)
    if config.data.resize != trained.data.resize:  # the images would not be made square as the model saw them
        raise ConfigError(f"data.resize: {config.data.resize}, but {MODELS / 'best.pt'} was trained with {trained.data.resize}; "
                          f"prepare and embed with -S data.resize={trained.data.resize}")
    check_image_cache(prepared_dir(config), [config.embed.split], config.data.cache_res, trained.data.img_res)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    dtype = resolve_precision(config.train.precision, device)
    split = PreparedSplit.load(prepared_dir(config), config.embed.split)

    start = time.perf_counter()
    images = encode_images(model, split, trained.data.img_res, config.embed.batch_size, device, dtype, config.data.num_workers,
                           progress=True, resize=config.data.resize)
    image_seconds = time.perf_counter() - start
    captions = encode_captions(model, split.captions, tokenize, config.embed.batch_size, device, dtype, progress=True)
    caption_seconds = time.perf_counter() - start - image_seconds
    log.info("encoded %d images (%.0f images/s) and %d captions (%.0f captions/s)",
             len(images), len(images) / image_seconds, len(captions), len(captions) / caption_seconds)

    meta = {
        "split": split.name, "dataset": config.data.dataset, "block_dim": trained.model.block_dim,
        "matching": trained.model.matching, "sinkhorn_iters": trained.model.sinkhorn_iters,
        "dustbin": model.dustbin.item(), "views": trained.model.views, "checkpoint_step": checkpoint["step"],
    }
    with atomic_path(EMBEDDINGS / split.name) as tmp:
        tmp.mkdir(parents=True)
        save_tensors({"embeddings": images, "image_ids": torch.from_numpy(split.image_ids)}, tmp / "images.pt")
        save_tensors({"embeddings": captions, "caption_image": torch.from_numpy(split.caption_image)}, tmp / "captions.pt")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("embeddings written to %s", EMBEDDINGS / split.name)


def evaluate(config: Config) -> None:
    """Score every image-caption pair exactly; write metrics, plots and per-query results; report to MLflow."""
    with _writing(EVAL_OUTPUTS):
        _evaluate(config)


def _evaluate(config: Config) -> None:
    from avse.data.dataset import PreparedSplit
    from avse.data.prepare import prepared_dir
    from avse.evaluation import eccv, evaluate as ev
    from avse.run_info import split_input
    from avse.tracking import Tracker

    split_name = config.embed.split
    embeddings = ev.Embeddings.load(EMBEDDINGS / split_name)
    ev.check_layout(embeddings)
    split = PreparedSplit.load(prepared_dir(config), split_name)
    if len(split.captions) != embeddings.captions.size(0):
        raise AvseError(f"{EMBEDDINGS / split_name}: {embeddings.captions.size(0)} captions, but split {split_name} has {len(split.captions)}; re-run embed")
    protocols = ev.resolve_protocols(config.eval.protocol, config.data.dataset)
    n_images = embeddings.images.size(0)
    if "5fold1k" in protocols and n_images % 1000:
        raise AvseError(f"eval.protocol: 5fold1k needs a multiple of 1000 images, but {split_name} has {n_images} (were images skipped?)")
    coco_test = config.data.dataset == "coco" and split_name == "testall"
    if coco_test:  # refused before the scoring, not after it
        annotations, alignment = ev.coco_test_alignment(split, config.eval.pm_gt_dir)
    sims = ev.score(embeddings, config.eval.chunk_size)
    results = {protocol: ev.protocol_metrics(sims, protocol) for protocol in protocols}
    if coco_test:
        results |= eccv.coco_test_metrics(sims, alignment, annotations)
    # One set: the metrics, plots and per-query files of one evaluation, never some of an earlier one.
    with atomic_paths(EVAL_METRICS, RECALL_CURVE, RECALL_PLOT, EVAL_OUTPUTS) as (metrics_file, curve_file, plot_file, outputs_dir):
        metrics_file.write_text(json_text({protocol: {k: round(v, 4) for k, v in m.items()} for protocol, m in results.items()}))
        ev.write_recall_curve(sims, curve_file, plot_file, f"{config.data.dataset} {split_name}: R@K")
        ev.write_per_query(sims, split.captions, embeddings.image_ids, split.image_paths, outputs_dir)

    run = json.loads((MODELS / "run.json").read_text()) if (MODELS / "run.json").exists() else {}
    tracker = Tracker(config.tracking)
    if run.get("run_id") and tracker.start(run["run_id"], run_name="", params={}, tags={}):
        evaluated = split_input(config, prepared_dir(config), split_name, "evaluation")
        tracker.log_metrics({f"{split_name}_{protocol}_{k}": v for protocol, m in results.items() for k, v in m.items()}, step=0,
                            model_id=run.get("model_id"), dataset=evaluated)
        for artifact in (EVAL_METRICS, RECALL_PLOT, RECALL_CURVE):
            tracker.log_artifact(artifact, "evaluation")
        tracker.finish()
    print(ev.format_table(results))
    if coco_test:
        print(ev.format_coco_test_table(results))


def import_checkpoint(source: Path, params: Path, overrides: list[str], trust: bool = False, out_dir: Path | None = None) -> Path:
    """Convert an official AVSE checkpoint into `models/best.pt` and `models/tokenizer/`.

    The model is configured from the checkpoint's stored options, then `params` and
    `overrides` for what the options do not say (data paths, a local BERT folder).
    Nothing is written unless every parameter converts with its expected shape.
    """
    from avse.config import load_config
    from avse.data.tokenizer import load_tokenizer
    from avse.model import backbones, official
    from avse.model.avse import build_model, random_backbones
    from avse.checkpoint import save_tensors

    out_dir = out_dir or MODELS
    content = official.read_checkpoint(source, trust)
    config = load_config(params, [*official.settings(official.options(content)), *overrides])
    family, vision_config = backbones.load_config(config.model.vision, "model.vision", ("vit", "swin"))
    state = official.convert_state_dict(content["model"], family)
    word_embeddings = state.get("text_encoder.backbone.embeddings.word_embeddings.weight")
    if word_embeddings is None:
        raise AvseError(f"{source}: no text backbone word embeddings (txt_enc.bert.embeddings.word_embeddings.weight)")
    vocab_size = word_embeddings.shape[0]
    image_size = official.vision_image_size(state, family, vision_config.patch_size)
    model = build_model(random_backbones(config), vocab_size, image_size)  # every weight comes from the checkpoint
    expected = model.state_dict()
    state.update({name: expected[name] for name in official.NOT_IN_OFFICIAL})
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    for what, names in (("missing", missing), ("not in the configured model", extra), ("of the wrong shape", wrong)):
        if names:
            raise AvseError(f"{source}: {len(names)} parameters {what} for {config.model.vision.name}: {', '.join(names[:5])}")
    tokenizer = load_tokenizer(backbones.source(config.model.text.name))
    if len(tokenizer) != vocab_size:
        raise AvseError(f"model.text.name: the tokenizer of {config.model.text.name} has {len(tokenizer)} tokens, "
                        f"the checkpoint's BERT {vocab_size}")
    model.load_state_dict(state)
    with _writing(out_dir), atomic_paths(out_dir / "tokenizer", out_dir / "best.pt") as (tokenizer_dir, checkpoint):
        tokenizer.save_pretrained(tokenizer_dir)
        save_tensors({
            "model": model.state_dict(), "config": config.to_dict(), "config_hash": config.hash(),
            "step": int(content.get("Eiters") or 0), "epoch": int(content.get("epoch") or 0),
            "dev_metrics": {"rsum": float(content.get("best_rsum") or 0.0)}, "vocab_size": vocab_size,
            "vision_image_size": model.image_encoder.backbone.config.image_size, "imported_from": str(source),
        }, checkpoint)
    log.info("imported %s (%s, %d parameters) into %s", source, config.model.vision.name, len(state), out_dir / "best.pt")
    return out_dir / "best.pt"
