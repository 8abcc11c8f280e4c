"""Training: sampler, schedule, precision, distributed equivalence, resume."""

import sys

import pytest
import torch

from avse import compute
from avse.config import from_dict
from avse.training import optim
from avse.training.distributed import DistContext
from avse.training.batches import GlobalBatchSampler
from avse.training.resume import training_hash
from avse.training.step import TrainingError, optimizer_step

from conftest import REPO, run

CPU = torch.device("cpu")


def batches(sampler: GlobalBatchSampler) -> list[list[tuple[int, int]]]:
    """The sampler's (caption index, item seed) keys, cut into its per-process batches."""
    order = list(sampler)
    return [order[i : i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


def test_global_batches_do_not_depend_on_the_number_of_processes():
    one = GlobalBatchSampler(30, 6, DistContext(0, 0, 1, CPU), seed=3)
    ranks = [GlobalBatchSampler(30, 3, DistContext(r, r, 2, CPU), seed=3) for r in range(2)]
    for sampler in (one, *ranks):
        sampler.set_epoch(2)
    expected = batches(one)
    assert len(expected) == 5
    assert [a + b for a, b in zip(batches(ranks[0]), batches(ranks[1]))] == expected  # item seeds included
    assert sorted(i for batch in expected for i, _ in batch) == list(range(30))


def test_sampler_shuffles_per_epoch_and_resumes_mid_epoch():
    sampler = GlobalBatchSampler(40, 4, DistContext(0, 0, 1, CPU), seed=0)
    sampler.set_epoch(0)
    epoch0 = batches(sampler)
    sampler.set_epoch(1)
    assert batches(sampler) != epoch0
    sampler.set_epoch(0, start_batch=7)
    assert batches(sampler) == epoch0[7:]
    assert len(sampler) == 3 * 4


def test_partial_global_batch_is_dropped():
    sampler = GlobalBatchSampler(10, 4, DistContext(0, 0, 1, CPU), seed=0)
    assert sampler.batches_per_epoch == 2 and len(list(sampler)) == 8


def test_lr_schedule_warmup_and_step_decay():
    train = from_dict({"train": {"warmup_steps": 4, "lr_decay_epochs": [2, 3], "lr_decay_rate": 0.5}}).train
    factors = [optim.lr_factor(step, steps_per_epoch=10, total_steps=50, config=train) for step in (0, 3, 10, 19, 20, 30, 45)]
    assert factors == pytest.approx([0.25, 1.0, 1.0, 1.0, 0.5, 0.25, 0.25])


def test_lr_schedule_warmup_and_cosine_decay_to_zero():
    train = from_dict({"train": {"warmup_steps": 4, "lr_schedule": "cosine"}}).train
    factors = [optim.lr_factor(step, steps_per_epoch=10, total_steps=104, config=train) for step in (0, 3, 4, 54, 104, 120)]
    assert factors == pytest.approx([0.25, 1.0, 1.0, 0.5, 0.0, 0.0])


def test_precision(monkeypatch):
    assert compute.resolve_precision("fp16", CPU) == torch.float16
    monkeypatch.setattr(compute, "cpu_has_fast_bf16", lambda: False)
    assert compute.resolve_precision("auto", CPU) == torch.float32
    monkeypatch.setattr(compute, "cpu_has_fast_bf16", lambda: True)
    assert compute.resolve_precision("auto", CPU) == torch.bfloat16


@pytest.mark.parametrize("native, emulated, expected", [(True, True, torch.bfloat16), (False, True, torch.float16), (False, False, torch.float16)])
def test_auto_precision_on_gpus_takes_bf16_only_where_it_is_native(monkeypatch, native, emulated, expected):
    """V100 and T4 emulate bf16 (slowly): `auto` trains them in fp16 with loss scaling."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: emulated if including_emulation else native)
    assert compute.resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_steps_the_fp16_scaler_skips_are_reported_as_not_applied():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    before = model.weight.detach().clone()
    scaler.scale(model(torch.tensor([[float("inf"), 1.0]])).sum()).backward()
    assert not optimizer_step(model, optimizer, scaler, grad_clip=2.0).applied
    assert torch.equal(model.weight, before) and scaler.get_scale() == 512.0
    scaler.scale(model(torch.tensor([[1.0, 1.0]])).sum()).backward()
    assert optimizer_step(model, optimizer, scaler, grad_clip=2.0).applied
    assert not torch.equal(model.weight, before) and scaler.get_scale() == 512.0


def test_cpu_bf16_attention_avoids_the_fused_kernel():
    # The fused CPU kernel's bf16 backward is several times slower than the matmul path's.
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    with compute.autocast(CPU, torch.bfloat16):
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert out.dtype == torch.bfloat16
    assert "Flash" not in type(out.grad_fn).__name__
    with compute.autocast(CPU, torch.float32):
        fused = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert "Flash" in type(fused.grad_fn).__name__
    with torch.no_grad(), compute.autocast(CPU, torch.bfloat16):  # inference keeps the fused kernel's faster forward
        assert torch.backends.cuda.flash_sdp_enabled()


def test_deterministic_gpu_training_takes_the_math_path_and_evaluation_the_fused_kernels():
    """Under train.deterministic, only forward passes that record gradients give up fused attention (their backward
    may sum in varying order); no-grad evaluation keeps flash attention's memory."""
    cuda = torch.device("cuda", 0)
    for_training = [torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.mem_efficient_sdp_enabled]
    with compute.autocast(cuda, torch.float32, deterministic=True):
        assert not any(enabled() for enabled in for_training) and torch.backends.cuda.math_sdp_enabled()
    with torch.no_grad(), compute.autocast(cuda, torch.float32, deterministic=True):
        assert all(enabled() for enabled in for_training)
    with compute.autocast(cuda, torch.float32, deterministic=False):
        assert all(enabled() for enabled in for_training)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator settings")
def test_retain_freed_memory_takes_effect_on_glibc():
    assert compute.retain_freed_memory() is True


def test_parameter_groups_and_learning_rates():
    from avse.model.avse import build_model

    config = from_dict({"train": {"lr": 1e-3, "backbone_lr_mult": 0.1, "weight_decay": 0.05, "temperature": 0.25}})
    model = build_model(config, vocab_size=100)
    assert model.scaled_logit_scale().exp().item() == pytest.approx(4.0)  # 1 / train.temperature
    optimizer = optim.build_optimizer(model, config.train)
    by_lr = {(g["lr"], g["weight_decay"]): sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    assert set(by_lr) == {(1e-4, 0.05), (1e-4, 0.0), (1e-3, 0.05), (1e-3, 0.0)}
    # Every trainable parameter is in exactly one group; the unused dustbin (max matching) in none.
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == sum(1 for p in model.parameters() if p.requires_grad)
    assert not model.dustbin.requires_grad and model.logit_scale.requires_grad
    head_no_decay = next(g for g in optimizer.param_groups if g["lr"] == 1e-3 and g["weight_decay"] == 0.0)
    assert any(p is model.logit_scale for p in head_no_decay["params"])


def test_resume_hash_ignores_run_length_but_not_model_data_or_layout(tmp_path):
    (tmp_path / "train.csv").write_text("image_id,image_file,image_path,caption\n0,a.jpg,a.jpg,a dog\n")

    def digest(tree=None, world=1, dtype=torch.float32, device=CPU):
        return training_hash(from_dict(tree or {}), world, dtype, tmp_path, device)

    base = digest()
    assert base == digest({"train": {"epochs": 50, "max_steps": 7, "log_every": 1, "grad_checkpointing": True}})
    assert base != digest({"train": {"lr": 0.1}})
    assert base != digest({"model": {"views": 1}})
    assert base != digest(world=2) and base != digest(dtype=torch.bfloat16)
    assert base != digest(device=torch.device("cuda", 0))  # a CPU run's optimiser state does not resume on a GPU
    assert digest(device=torch.device("cuda", 0)) == digest(device=torch.device("cuda", 1))
    (tmp_path / "train.csv").write_text("image_id,image_file,image_path,caption\n0,a.jpg,a.jpg,a cat\n")
    assert base != digest()


def test_epochs_hold_whole_accumulation_windows():
    sampler = GlobalBatchSampler(50, 4, DistContext(0, 0, 1, CPU), seed=0, accumulation=5)
    assert sampler.batches_per_epoch == 10  # 12 batches fit, 2 whole windows of 5


def test_non_finite_gradients_are_not_applied():
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = model.weight.detach().clone()
    model(torch.tensor([[float("inf"), 1.0]])).sum().backward()
    assert not optimizer_step(model, optimizer, scaler, grad_clip=2.0).applied
    assert torch.equal(model.weight, before) and model.weight.grad is None
    model(torch.tensor([[1.0, 1.0]])).sum().backward()
    assert optimizer_step(model, optimizer, scaler, grad_clip=0.0).applied
    assert not torch.equal(model.weight, before)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.mark.parametrize("loss", ["infonce", "hinge"])
def test_two_processes_match_one_on_the_same_global_batch(tmp_path, loss):
    worker = str(REPO / "tests" / "ddp_worker.py")
    # A hang stops inside the worker (its process group times out after 60 s of waiting); the generous limit here
    # is for a slow start on a loaded machine, which once took 180 s.
    run([sys.executable, worker, str(tmp_path / "one.pt"), loss], cwd=REPO, timeout=600)
    run([*TORCHRUN, "--nproc_per_node=2", worker, str(tmp_path / "two.pt"), loss], cwd=REPO, timeout=600)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert two["objective"] == pytest.approx(one["objective"], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 20
    for name, grad in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_trainable_parameter_without_a_gradient_stops_the_step_with_its_name():
    """What DistributedDataParallel would stop on at the next step, named at the first, on one process too."""
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(2, 1), "idle": torch.nn.Linear(2, 1)})
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model["used"](torch.ones(1, 2)).sum().backward()
    with pytest.raises(TrainingError, match=r"^2 trainable parameters got no gradient \(idle.weight, idle.bias\)"):
        optimizer_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), grad_clip=2.0)


@pytest.mark.parametrize("late", [1, 0])
def test_a_process_waiting_past_the_timeout_stops_with_the_parameter_named(late):
    """The other processes wait for the first one's dev evaluation no longer than train.dist_timeout_minutes, and
    the first waits for them as long. The wait runs on a gloo group whatever the backend, so under NCCL too."""
    result = run([*TORCHRUN, "--nproc_per_node=2", str(REPO / "tests" / "timeout_worker.py"), "3", str(late)], cwd=REPO, check=False,
                 timeout=300)
    assert result.returncode != 0
    assert (f"error: process {1 - late} waited more than train.dist_timeout_minutes (0.05) for the other processes while the first "
            "evaluated the dev split and wrote checkpoints: one of them died or hangs") in result.stderr
