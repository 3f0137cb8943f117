"""Fast checks of the run's `deterministic` switch: where the run config sends it, what it
sets in torch and gives back, the thread count a Ray Train worker gets, and what an
operation without a deterministic kernel does under it."""

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from amused.orchestration.run import plan
from amused.orchestration.run_config import parse_run_config
from amused.plumbing.determinism import deterministic_torch, machine_threads
from amused.tokenizer.image import build_vqgan
from amused.tokenizer.vq_objective import vq_forward
from amused.training.config import EngineConfig, load_config
from amused.training.engine import kernels
from amused.training.launch import with_worker_threads

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_is_deterministic_and_the_run_derives_it_into_each_stage(demo):
    cfg = parse_run_config(demo)
    assert cfg.deterministic is True
    sections = ("vqgan", "pretokenize", "train", "evaluate")
    assert all(getattr(cfg, s).deterministic for s in sections)
    off = parse_run_config({k: v for k, v in demo.items() if k != "deterministic"})  # off unless asked
    assert not off.deterministic and not any(getattr(off, s).deterministic for s in sections)


def test_a_stage_setting_of_it_or_a_non_boolean_is_refused(demo):
    bad = copy.deepcopy(demo)
    bad["train"]["deterministic"] = False
    with pytest.raises(ValueError, match=r"train\.deterministic is set by the run"):
        parse_run_config(bad)
    with pytest.raises(ValueError, match="deterministic: expected true or false, got 'yes'"):
        parse_run_config({**demo, "deterministic": "yes"})


def test_it_is_not_part_of_any_fingerprint(demo):
    """Kernels and threads, not what is computed (as model.compile): a finished run keeps its
    stages when it is turned on or off."""
    assert plan(parse_run_config(demo)) == plan(parse_run_config({**demo, "deterministic": False}))


def test_deterministic_torch_sets_the_kernels_and_threads_and_gives_them_back():
    threads = torch.get_num_threads()
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_torch(1):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="threads: 0 must be >= 1"):
        with deterministic_torch(0):
            pass
    assert not torch.are_deterministic_algorithms_enabled()


def test_an_operation_without_a_deterministic_kernel_raises_rather_than_warns():
    # Most such gaps are CUDA kernels; put_ without accumulate has none on any device.
    with deterministic_torch(None):
        with pytest.raises(RuntimeError, match="put_ does not have a deterministic implementation"):
            torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))
    torch.zeros(3).put_(torch.tensor([0]), torch.tensor([1.0]))  # and afterwards it runs again


def test_kernels_follow_the_training_config():
    with kernels(False, 1):
        assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == machine_threads()
    with kernels(True, 1):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
    with kernels(True, None):
        assert torch.get_num_threads() == machine_threads()
    with pytest.raises(ValueError, match="engine.threads must be >= 1"):
        EngineConfig(threads=0)


def test_a_ray_train_worker_gets_its_cpus_as_threads_only_when_deterministic():
    cfg = load_config(str(ROOT / "configs/train-tiny.yaml"))
    assert with_worker_threads(cfg, 2.0) is cfg  # off: Ray's OMP_NUM_THREADS as before
    on = dataclasses.replace(cfg, deterministic=True)
    assert with_worker_threads(on, 2.0).engine.threads == 2
    assert with_worker_threads(on, 0.5).engine.threads == 1
    given = dataclasses.replace(on, engine=dataclasses.replace(on.engine, threads=3))
    assert with_worker_threads(given, 2.0).engine.threads == 3


def test_the_vq_codebook_gradient_sums_in_the_same_order_every_time():
    """The VQ-GAN's codebook lookup: many latents choose the same code, and the gradient of
    each code sums theirs; with indexing (`codebook[ids]`) the CPU threads added them
    atomically in whatever order they ran, and two runs of the demo's VQ-GAN parted at step
    ~40. Big enough for torch to split the sum over threads (>= 32768 elements)."""
    torch.manual_seed(0)
    model = build_vqgan("tiny")
    pixels = torch.rand(16, 3, 128, 128)
    weights = torch.linspace(-1, 1, 16 * 16 * 16 * 16).view(16, 16, 16, 16)  # a gradient to sum per code
    grads, previous = [], torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    try:
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            fwd = vq_forward(model, pixels)
            assert fwd.quantized.shape == weights.shape and fwd.ids.unique().numel() <= 64  # codes chosen many times
            (fwd.quantized * weights).sum().backward()
            grads.append(model.quantize.embedding.weight.grad.clone())
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
