"""The `avse` command: the pipeline's stages and tools, with DVC-style `-S key=value` overrides."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from typing import Callable, Sequence, get_args

from avse.config import PARAMS_FILE, Config, SplitName, load_config
from avse.errors import AvseError
from avse.launch.signals import StopSignals


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=PARAMS_FILE, help="parameters file (default: %(default)s)")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a parameter, as `dvc exp run -S` (repeatable), e.g. -S train.batch_size=64",
    )


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.overrides)


def _cmd_stage(stage: Callable[[Config], None]) -> Callable[[argparse.Namespace], None]:
    return lambda args: stage(_config(args))


def _cmd_train(args: argparse.Namespace) -> None:
    from avse.io import writer_lock
    from avse.launch.leases import leased_visible_gpus
    from avse.pipeline import MODELS
    from avse.training.distributed import under_torchrun
    from avse.training.preflight import check_training_setup

    config = _config(args)
    if args.dry_run:
        from avse.training.dry_run import dry_run

        _check_positive("--steps", args.steps)
        check_training_setup(config)
        dry_run(config, args.steps)
        return
    # The GPUs are leased once, by the command a user or a queue started: torchrun's processes inherit them. That command
    # also holds the writer lock of models/ for them: a second run in the same project stops at once.
    started_here = not under_torchrun()
    leasing = config.train.gpus == "auto" and started_here
    # Listening from the start: a stop signal that comes while the run starts (or waits for a GPU) stops it at its first step.
    with (writer_lock(MODELS) if started_here else contextlib.nullcontext(), StopSignals() as signals,
          leased_visible_gpus(config.train.nproc_per_node) if leasing else contextlib.nullcontext()):
        _train(args, config, signals)


def _train(args: argparse.Namespace, config: Config, signals: StopSignals) -> None:
    """`avse train` with its GPUs chosen: the checks, then the run, under torchrun for several processes."""
    from avse import pipeline
    from avse.data.dataset import check_image_cache
    from avse.data.prepare import prepared_dir
    from avse.launch.signals import StoppedBySignal, run_passing_stop_signals
    from avse.training.distributed import under_torchrun
    from avse.training.preflight import check_training_setup

    check_training_setup(config)
    check_image_cache(prepared_dir(config), ("train", "dev"), config.data.cache_res, config.data.img_res)
    nproc = config.train.nproc_per_node
    if nproc > 1 and not under_torchrun():
        if signals.requested:
            raise StoppedBySignal(f"stopped by {signals.received.name} before training started; rerun the same command to train")
        # Relaunch this same command under torchrun; multi-node runs call torchrun directly (see README).
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "avse.cli", "train", "--params", args.params]
        command += [f"--set={override}" for override in args.overrides]
        returncode, stopped_by = run_passing_stop_signals(command)
        if stopped_by:
            sys.exit(2)  # the first process said where it stopped and how to resume
        if returncode:
            raise AvseError(f"training under torchrun failed (exit status {returncode}); see the messages above")
        return
    pipeline.train(config, signals)


def _cmd_search(args: argparse.Namespace) -> None:
    from pathlib import Path

    from avse.data.dataset import PreparedSplit
    from avse.data.prepare import prepared_dir
    from avse.evaluation import search
    from avse.pipeline import EMBEDDINGS, MODELS

    if (args.query is None) == (args.image is None):
        raise AvseError("search: give either a text query or --image PATH")
    _check_positive("-k", args.k)
    out = Path(args.out) if args.out else None
    # matplotlib would write `<name>.png` beside a folder or a name without a suffix, not `<name>` itself.
    if out and (out.suffix.lower() != ".png" or out.is_dir()):
        raise AvseError(f"--out {out}: expected the name of a .png file to write")
    config = _config(args)
    split_name = args.split or config.embed.split
    split = PreparedSplit.load(prepared_dir(config), split_name)
    if args.model:
        from avse.serving import load_model
        from avse.tracking import store_uri

        index = search.SearchIndex.embed(load_model(args.model, store_uri(config.tracking.uri)), split, config.embed.batch_size)
    else:
        index = search.SearchIndex.load(MODELS, EMBEDDINGS / split_name, split)
    if args.query is not None:
        hits = index.text_to_images(args.query, args.k)
        print(f'top {len(hits)} {split_name} images for "{args.query}":')
    else:
        hits = index.image_to_captions(args.image, args.k)
        print(f"top {len(hits)} {split_name} captions for {args.image}:")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:>3}  {hit.score:8.4f}  {hit.text}")
    if out:
        if args.query is not None:
            search.render_text_query(args.query, hits, out)
        else:
            search.render_image_query(args.image, hits, out)
        print(f"wrote {out}")


def _check_positive(option: str, value: int) -> None:
    if value < 1:
        raise AvseError(f"{option}: {value} is not a positive integer")


def _cmd_compare(args: argparse.Namespace) -> None:
    from pathlib import Path

    from avse.analysis.compare import comparison_table, load_runs, seed_summary, summary_for_reading, write_comparison
    from avse.tracking import store_uri

    tracking = _config(args).tracking
    table = comparison_table(load_runs(store_uri(tracking.uri), tracking.experiment, args.dataset, args.since))
    if table.empty:
        raise AvseError(f"no runs in experiment {tracking.experiment!r} at {tracking.uri} match the filters")
    for path in write_comparison(table, Path(args.out)):
        print(f"wrote {path}")
    shown = summary_for_reading(seed_summary(table))
    print(shown[["experiment", "differs", "dataset", "backbone", "resolution", "n", "seeds", "i2t_r1", "t2i_r1", "rsum"]].to_string(index=False))


def _cmd_register(args: argparse.Namespace) -> None:
    from avse.registry import register_champions
    from avse.tracking import store_uri

    tracking = _config(args).tracking
    for champion in register_champions(store_uri(tracking.uri), tracking.experiment, args.alias, args.dataset):
        state = "registered" if champion.new else "unchanged"
        print(f"{state:<11} models:/{champion.name}@{champion.alias} = version {champion.version} "
              f"(run {champion.run_id}, test rsum {champion.rsum:.1f})")


def _cmd_tracking_sync(args: argparse.Namespace) -> None:
    from pathlib import Path

    from avse.tracking import sync_unsent

    print(f"sent {sync_unsent(Path(args.file))} metric records to MLflow")


def _cmd_exp(args: argparse.Namespace) -> None:
    import shlex
    import subprocess

    from avse.experiments import load_experiments, markdown_table, select

    experiments = load_experiments(args.experiments)
    if args.table:
        print(markdown_table(experiments))
        return
    if args.list or not args.names:
        width = max(map(len, experiments))
        for e in experiments.values():
            print(f"{e.name:<{width}}  {e.title}, {e.processes} process(es), evaluated on the {e.evaluation}")
        return
    for experiment in select(experiments, args.names):
        if args.slurm:
            from avse.launch.slurm import JOBS_DIR, submit

            job = submit(experiment, args.overrides, args.params, args.gpus_per_node, args.sbatch)
            print(f"{experiment.name}: Slurm job {job}, working copy {JOBS_DIR / experiment.name}, log {JOBS_DIR / experiment.name}.log", flush=True)
            continue
        if args.show:
            print(f"# {experiment.name}: {experiment.title}")
            print("\n".join(experiment.overrides()))
            continue
        experiment.config(args.params, args.overrides)  # a wrong extra -S stops here, not inside dvc
        commands = [experiment.run_command(args.queue, args.overrides)]
        if args.evaluate:  # the experiment's outputs into the workspace, then whatever of embed/evaluate is missing
            commands = [["dvc", "exp", "apply", experiment.name], ["dvc", "repro", "evaluate"]]
        for command in commands:
            print(shlex.join(command), flush=True)
            if not args.print_only and subprocess.run(command).returncode:
                raise AvseError(f"{experiment.name}: `{shlex.join(command)}` failed; see the messages above")


def _cmd_ui(args: argparse.Namespace) -> None:
    from avse.tracking import runs_table_url, store_uri

    tracking = _config(args).tracking
    store = store_uri(args.store or tracking.uri)
    print(f"MLflow UI on {store}; the runs of experiment {tracking.experiment!r}: "
          f"{runs_table_url(store, tracking.experiment, args.host, args.port)}", flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", args.host, "--port", str(args.port)])


def _cmd_params(args: argparse.Namespace) -> None:
    if args.reference:
        from avse.reference import parameter_reference

        print(parameter_reference(args.params), end="")
        return
    for key, value in _config(args).flat().items():
        print(f"{key}: {value}")


def _cmd_convert_karpathy(args: argparse.Namespace) -> None:
    from pathlib import Path

    from avse.data.formats import read_karpathy, write_caption_splits

    dataset = read_karpathy(Path(args.json), args.dataset)
    if dataset.problems:
        raise AvseError("\n".join(map(str, dataset.problems[:20])))
    write_caption_splits(dataset, Path(args.out))
    print(f"wrote the caption-split layout of {args.json} to {args.out}")


def _cmd_import_checkpoint(args: argparse.Namespace) -> None:
    from pathlib import Path

    from avse import pipeline

    written = pipeline.import_checkpoint(Path(args.checkpoint), args.params, args.overrides, args.trust_checkpoint, Path(args.out))
    print(f"wrote {written}; evaluate it with `avse embed && avse evaluate` (or `dvc repro -s embed && dvc repro -s evaluate`)")


def build_parser() -> argparse.ArgumentParser:
    from avse import pipeline

    parser = argparse.ArgumentParser(prog="avse", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stages = {
        "synthesize": (pipeline.synthesize, "generate the embedded synthetic dataset"),
        "prepare": (pipeline.prepare, "validate the raw dataset and write data/prepared/<dataset>/"),
        "embed": (pipeline.embed, "encode the evaluation split with models/best.pt into embeddings/<split>/"),
        "evaluate": (pipeline.evaluate, "score the embeddings: metrics/eval.json, plots, per-query results"),
    }
    for name, (stage, help_text) in stages.items():
        sub = commands.add_parser(name, help=help_text)
        _add_config_options(sub)
        sub.set_defaults(run=_cmd_stage(stage))

    sub = commands.add_parser("train", help="train the model (under torchrun when train.nproc_per_node > 1)")
    _add_config_options(sub)
    sub.add_argument("--dry-run", action="store_true", help="run a few steps on random inputs of the configured shape, no data needed")
    sub.add_argument("--steps", type=int, default=3, help="timed steps of --dry-run (default: %(default)s)")
    sub.set_defaults(run=_cmd_train)

    sub = commands.add_parser("search", help="top-k images for a text query, or top-k captions for an image")
    _add_config_options(sub)
    sub.add_argument("query", nargs="?", help="a caption to search images with")
    sub.add_argument("--image", help="an image file to search captions with")
    sub.add_argument("-k", type=int, default=5, help="results to return (default: %(default)s)")
    sub.add_argument("--split", choices=get_args(SplitName), help="embedded split to search (default: embed.split)")
    sub.add_argument("--out", help="write the query and the results as one picture (a .png file)")
    sub.add_argument("--model", help="search with an MLflow model instead of models/best.pt, e.g. models:/<name>@champion "
                                     "(embeds the split with it; the store is tracking.uri)")
    sub.set_defaults(run=_cmd_search)

    sub = commands.add_parser("register", help="register the best run per dataset, backbone and resolution in the Model Registry")
    _add_config_options(sub)
    sub.add_argument("--alias", default="champion", help="alias pointed at each best model (default: %(default)s)")
    sub.add_argument("--dataset", help="only runs tagged with this dataset")
    sub.set_defaults(run=_cmd_register)

    sub = commands.add_parser("compare", help="one row per experiment (runs that differ only in train.seed), mean ± sd over seeds: "
                                  "metrics/comparison.{csv,md,png}; every run: metrics/comparison_runs.csv")
    _add_config_options(sub)
    sub.add_argument("--dataset", help="only runs tagged with this dataset")
    sub.add_argument("--since", help="only runs started on or after this date (YYYY-MM-DD)")
    sub.add_argument("--out", default="metrics", help="output folder (default: %(default)s)")
    sub.set_defaults(run=_cmd_compare)

    sub = commands.add_parser("ui", help="the MLflow UI on the project's store, with the address of the experiment's runs table")
    _add_config_options(sub)
    sub.add_argument("--store", help="tracking store (default: tracking.uri)")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=5000)
    sub.set_defaults(run=_cmd_ui)

    sub = commands.add_parser("tracking-sync", help="send metrics kept while the MLflow store was unreachable")
    sub.add_argument("file", nargs="?", default="metrics/untracked.jsonl")
    sub.set_defaults(run=_cmd_tracking_sync)

    sub = commands.add_parser("exp", help="run a named experiment of experiments.yaml (the paper's rows) as one `dvc exp run`")
    _add_config_options(sub)
    sub.add_argument("names", nargs="*", metavar="NAME", help="experiment names or shell patterns (f30k-*); none: list them")
    sub.add_argument("--experiments", default="experiments.yaml", help="experiments file (default: %(default)s)")
    sub.add_argument("--list", action="store_true", help="list the experiments")
    sub.add_argument("--show", action="store_true", help="print each experiment's settings as -S overrides")
    sub.add_argument("--table", action="store_true", help="print the experiments as the README's markdown table")
    sub.add_argument("--queue", action="store_true", help="queue instead of running (`dvc queue start` runs the queue)")
    sub.add_argument("--evaluate", action="store_true", help="bring a finished experiment's results into the workspace "
                                                             "(`dvc exp apply`) and rerun what embed/evaluate lack")
    sub.add_argument("--print", dest="print_only", action="store_true", help="print the dvc commands without running them")
    sub.add_argument("--slurm", action="store_true", help="submit each experiment as a Slurm batch job, in a working copy of its own "
                                                          "that a requeue resumes in (see docs/clusters.md)")
    sub.add_argument("--sbatch", default="", metavar="OPTIONS", help='more sbatch options for --slurm, e.g. "--partition=gpu --time=24:00:00"')
    sub.add_argument("--gpus-per-node", type=int, metavar="N", help="GPUs a --slurm job asks for (default: the experiment's processes; "
                                                                    "0 on a cluster without GPUs)")
    sub.set_defaults(run=_cmd_exp)

    sub = commands.add_parser("params", help="print the validated parameters, with overrides applied")
    _add_config_options(sub)
    sub.add_argument("--reference", action="store_true", help="print the parameter reference (docs/parameters.md) made from the file's comments")
    sub.set_defaults(run=_cmd_params)

    sub = commands.add_parser("import-checkpoint", help="convert a checkpoint of the official AVSE code into models/best.pt")
    _add_config_options(sub)
    sub.add_argument("checkpoint", help="the official checkpoint (e.g. runs/f30k_vit_224/model_best.pth)")
    sub.add_argument("--out", default="models", help="output folder (default: %(default)s)")
    sub.add_argument("--trust-checkpoint", action="store_true",
                     help="also unpickle objects other than tensors and options (runs code from the file: trusted sources only)")
    sub.set_defaults(run=_cmd_import_checkpoint)

    sub = commands.add_parser("convert-karpathy", help="write a Karpathy dataset_*.json as caption-split files")
    sub.add_argument("json", help="dataset_flickr30k.json or dataset_coco.json")
    sub.add_argument("out", help="output folder")
    sub.add_argument("--dataset", choices=("f30k", "coco"), required=True)
    sub.set_defaults(run=_cmd_convert_karpathy)
    return parser


def setup_logging() -> None:
    # Under torchrun only the first process reports, so the log reads as one run.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return run_guarded(lambda: args.run(args))


def run_guarded(work: Callable[[], None]) -> int:
    """Run `work`; a user error prints one message (no traceback) and exits with status 2."""
    from avse.launch.signals import LAUNCHED_BY_AVSE_TRAIN, StoppedBySignal

    try:
        work()
    except StoppedBySignal as err:
        if os.environ.get("RANK", "0") == "0":  # every process stops alike: one says so
            print(f"error: {err}", file=sys.stderr)
        return 0 if os.environ.get(LAUNCHED_BY_AVSE_TRAIN) else 2  # under `avse train`, it gives the status
    except AvseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a stage (stages make it an Interrupted error, training a checkpoint)
        print("error: interrupted by SIGINT", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader of the output has gone (`avse params | head`): stop quietly, with the status a shell gives a
        # tool that SIGPIPE ended. Python flushes stdout again at exit, so it writes to /dev/null from now on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 0


def run_stage(name: str) -> None:
    """Entry point of `stages/<name>.py`: the same as `avse <name>`, with the same options."""
    sys.exit(main([name, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
