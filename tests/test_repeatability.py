"""Repeatable runs: derived seeds, and the whole pipeline run twice giving the same bits."""

import json
import shutil

import pytest
import torch

from avse.training.batches import GlobalBatchSampler
from avse.checkpoint import load_checkpoint
from avse.training.distributed import DistContext
from avse.training.seeding import Draw, derive_seed

from conftest import TINY, copy_finished, run, set_params

CPU = torch.device("cpu")
OUTPUTS = ("models", "embeddings", "metrics", "outputs")


def test_derived_seeds_are_fixed_numbers_apart_for_every_purpose_and_position():
    # Fixed across machines, processes and Python versions: a change here changes every run's draws.
    assert derive_seed(0, Draw.INIT) == 7696292205685908379
    assert derive_seed(0, Draw.BATCH, 0, 0, 0) == 5249891134244267531
    seeds = {derive_seed(seed, purpose, *position) for seed in (0, 1) for purpose in Draw for position in ((0,), (1,), (0, 1), (1, 0))}
    assert len(seeds) == 2 * len(Draw) * 4 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(-1, Draw.INIT)


def test_the_shuffle_of_one_seed_is_not_the_next_epoch_of_another():
    def order(seed, epoch):
        sampler = GlobalBatchSampler(50, 5, DistContext(0, 0, 1, CPU), seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 1) != order(1, 0) and order(0, 0) != order(1, 0)
    assert order(3, 2) == order(3, 2)


def model_tensors(path):
    return load_checkpoint(path)["model"]


def test_dvc_repro_twice_gives_the_same_bits_with_or_without_loader_workers(tiny_pipeline, tmp_path):
    project = copy_finished(tiny_pipeline, tmp_path / "project")
    first = {name: (project / "metrics" / name).read_bytes() for name in ("train.json", "eval.json", "recall_curve.csv")}
    first_model = model_tensors(project / "models" / "best.pt")
    first_last = load_checkpoint(project / "models" / "last.pt")
    first_embeddings = torch.load(project / "embeddings" / "test" / "images.pt")["embeddings"]
    for name in OUTPUTS:
        shutil.rmtree(project / name)
    set_params(project, {"data": {"num_workers": 2}})  # TINY loads in the main process
    run(["dvc", "repro", "--force"], cwd=project)
    assert {name: (project / "metrics" / name).read_bytes() for name in first} == first
    second_model = model_tensors(project / "models" / "best.pt")
    assert first_model.keys() == second_model.keys()
    for name, tensor in first_model.items():
        assert torch.equal(second_model[name], tensor), name
    second_last = load_checkpoint(project / "models" / "last.pt")
    for name, tensor in first_last["optimizer"]["state"].items():
        assert all(torch.equal(second_last["optimizer"]["state"][name][k], v) for k, v in tensor.items())
    assert torch.equal(torch.load(project / "embeddings" / "test" / "images.pt")["embeddings"], first_embeddings)
    # What varies from run to run is kept apart, in its own file.
    assert set(json.loads((project / "metrics" / "train_speed.json").read_text())) == {"train_seconds", "pairs_per_s", "data_wait_fraction"}


def test_the_seed_decides_the_initial_weights():
    from avse.config import from_dict
    from avse.model.avse import build_model
    from avse.training.seeding import seed_draws

    def initial(seed):
        seed_draws(seed, Draw.INIT)
        return build_model(from_dict(TINY), vocab_size=100).state_dict()

    seed0, again, seed1 = initial(0), initial(0), initial(1)
    assert all(torch.equal(again[name], tensor) for name, tensor in seed0.items())
    randomised = [name for name, tensor in seed0.items() if tensor.numel() > 1 and tensor.std() > 0]
    assert len(randomised) > 20 and all(not torch.equal(seed1[name], seed0[name]) for name in randomised)
