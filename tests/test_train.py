"""Training in one process: objective, activation checkpointing, config errors, the
non-finite policy, crash leftovers, that the model learns, and the process group a
training runs in."""

import copy
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from amused.demo.datasets import write_token_dataset
from amused.pipeline.shards import TokenDataset
from amused.tokenizer.presets import UVIT_CONFIGS
from amused.training.checkpoint import Checkpoint
from amused.training.config import parse_config
from amused.training.distributed import in_process_group, process_group
from amused.training.engine import NonFiniteError
from amused.training.uvit import task as uvit_task
from amused.training.uvit.data import ShardReader
from amused.training.uvit.model import build_model, enable_activation_checkpointing
from amused.training.uvit.objective import draw_masks
from amused.training.uvit.task import train
from tests.samples import free_port


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("train") / "tokens")
    write_token_dataset(url, [300, 200, 150])
    return url


def config(run_dir, dataset, **over):
    cfg = {"run_dir": str(run_dir), "steps": 20, "seed": 0,
           "data": {"dataset": dataset, "global_batch_size": 16, "micro_batch_size": 8, "workers": 0},
           "model": {"preset": "tiny"}, "optim": {"lr": 3e-3, "warmup_steps": 5},
           "checkpoint": {"every": 10}, "log": {"every": 1, "progress": False}}
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            cfg[section] = {**cfg.get(section, {}), field: value}
        else:
            cfg[section] = value
    return cfg


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- objective

def test_masks_follow_the_cosine_schedule_and_drop_the_configured_fraction():
    m = draw_masks(seed=0, step=3, lanes=4, rows=1000, grid=(8, 8), rect_prob=0.0, cond_drop_prob=0.1)
    counts = m.masked.flatten(2).sum(-1)
    assert counts.min() >= 1
    # E[cos(pi/2 t)] = 2/pi for t ~ U(0, 1); 4000 samples: standard error ~0.005.
    assert counts.float().mean() / 64 == pytest.approx(2 / math.pi, abs=0.02)
    # 10% of samples lose their caption (open-muse and diffusers' script keep 10% instead).
    assert m.drop_cond.float().mean() == pytest.approx(0.1, abs=0.015)
    again = draw_masks(seed=0, step=3, lanes=4, rows=1000, grid=(8, 8), rect_prob=0.0, cond_drop_prob=0.1)
    assert torch.equal(m.masked, again.masked) and torch.equal(m.drop_cond, again.drop_cond)
    other = draw_masks(seed=0, step=4, lanes=4, rows=1000, grid=(8, 8), rect_prob=0.0, cond_drop_prob=0.1)
    assert not torch.equal(m.masked, other.masked)
    # A rank's micro-batch is its lanes' rows, lane-major, whatever the split.
    part, drop = m.micro(range(2, 4), slice(10, 14))
    assert torch.equal(part, m.masked[2:4, 10:14].reshape(8, 8, 8))
    assert torch.equal(drop, m.drop_cond[2:4, 10:14].reshape(8))


def test_rectangle_masks_are_one_rectangle_of_about_the_drawn_size():
    plain = draw_masks(seed=5, step=0, lanes=1, rows=300, grid=(8, 8), rect_prob=0.0, cond_drop_prob=0.0)
    rect = draw_masks(seed=5, step=0, lanes=1, rows=300, grid=(8, 8), rect_prob=1.0, cond_drop_prob=0.0)
    assert rect.rectangles and not plain.rectangles
    # The same draw of sizes; a rectangle rounds its area up by less than one row or column.
    sizes = plain.masked.flatten(2).sum(-1)[0]
    for mask, n in zip(rect.masked[0], sizes.tolist()):
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert int(mask.sum()) == h * w  # filled bounding box: one rectangle
        assert n <= h * w < n + max(h, w)


# ---------------------------------------------------------------- model

def test_presets_equal_the_released_transformers():
    cfg = UVIT_CONFIGS["amused-256"]
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["codebook_size"]) == (1024, 22, 8256, 8192)
    assert UVIT_CONFIGS["amused-512"]["downsample"] and UVIT_CONFIGS["amused-512"]["sample_size"] == 32
    model = build_model("amused-256")
    assert 595e6 < sum(p.numel() for p in model.parameters()) < 610e6


def test_activation_checkpointing_keeps_the_loss_and_saves_less():
    torch.manual_seed(0)
    base = build_model("tiny")
    ckpt = copy.deepcopy(base)
    enable_activation_checkpointing(ckpt)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 65, (4, 8, 8), generator=g)
    hidden, pooled = torch.randn(4, 8, 32, generator=g), torch.randn(4, 32, generator=g)
    micro = torch.tensor([[256.0, 256, 0, 0, 6]] * 4)

    def run(model):
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, hidden, pooled, micro).float().logsumexp(1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved[0]

    loss_a, grads_a, saved_a = run(base)
    loss_b, grads_b, saved_b = run(ckpt)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-7)
    assert saved_b < 0.8 * saved_a, (saved_a, saved_b)
    assert set(ckpt.state_dict()) == set(base.state_dict())  # names unchanged: checkpoints and export still load


def test_activation_checkpointing_in_the_engine_gives_the_same_losses(tmp_path, tokens):
    plain = train(parse_config(config(tmp_path / "plain", tokens, steps=8)))
    ckpt = train(parse_config(config(tmp_path / "ckpt", tokens, steps=8, model={"preset": "tiny",
                                                                                "activation_checkpointing": True})))
    assert plain.step == ckpt.step == 8
    assert [r["loss"] for r in metrics(tmp_path / "plain")] == [r["loss"] for r in metrics(tmp_path / "ckpt")]


# ---------------------------------------------------------------- config and start-up errors

@pytest.mark.parametrize("change, message", [
    (lambda c: c["data"].update(bogus=1), "unknown key 'data.bogus'"),
    (lambda c: c.update(steps="ten"), "steps: expected int"),
    (lambda c: c["model"].update(preset="huge"), "model.preset: 'huge' is not one of"),
    (lambda c: c.update(engine={"zero_stage": 3}), "engine.zero_stage must be 0, 1 or 2"),
    (lambda c: c.pop("data"), "missing required key 'data'"),
])
def test_config_errors_name_the_key(tmp_path, tokens, change, message):
    cfg = config(tmp_path / "run", tokens)
    change(cfg)
    with pytest.raises(ValueError, match=message):
        parse_config(cfg)


@pytest.mark.parametrize("over, message", [
    ({"data__dataset": "/nonexistent/tokens"}, "no token dataset at /nonexistent/tokens"),
    ({"data__global_batch_size": 12}, "global_batch_size=12 must be a multiple"),
    ({"model": {"preset": "amused-256"}}, r"token grid \(8, 8\) in the dataset, \(16, 16\) in the model"),
])
def test_bad_setups_fail_before_any_work(tmp_path, tokens, over, message):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(parse_config(config(run_dir, tokens, **over)))
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_tokens_from_another_tokenizer_are_refused(tmp_path, tokens, tiny_models):
    cfg = config(tmp_path / "run", tokens, model={"preset": "tiny", "vqgan": str(tiny_models / "vqgan")})
    with pytest.raises(ValueError, match="model.vqgan = .* is not the model the token dataset was made with"):
        train(parse_config(cfg))


# ---------------------------------------------------------------- non-finite policy

def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    url = str(tmp_path / "nan-tokens")
    write_token_dataset(url, [320], nan_rows=(7, 200))
    result = train(parse_config(config(tmp_path / "run", url, steps=40, checkpoint={"every": 40})))
    lines = metrics(tmp_path / "run")
    skipped = [r["step"] for r in lines if r["nonfinite_skipped"]]
    # Exactly the steps whose batch held a NaN row (crop_left carries the row number).
    reader = ShardReader(TokenDataset(url), lanes=1, rank=0, world_size=1, lane_batch=8, accum=2,
                         window_rows=1024, seed=0)
    poisoned = [step for step in range(1, 41)
                if any([{7, 200} & set(next(reader)["micro_conds"][:, 3].long().tolist()) for _ in range(2)])]
    assert skipped == poisoned and len(poisoned) >= 3  # 2 rows x 2 epochs, unless two share a batch
    assert all(math.isfinite(r["loss"]) for r in lines if r["loss"] is not None)
    state = Checkpoint.at(result.checkpoint).state_dict(ema=False)
    assert all(torch.isfinite(t).all() for t in state.values())

    bad = str(tmp_path / "all-nan")
    write_token_dataset(bad, [64], nan_rows=tuple(range(64)))
    with pytest.raises(NonFiniteError, match="3 steps in a row had a non-finite loss"):
        train(parse_config(config(tmp_path / "run2", bad, engine={"max_nonfinite_in_row": 3})))


# ---------------------------------------------------------------- learning, resume leftovers

def test_learns_the_tokens_a_caption_implies(tmp_path, tokens, monkeypatch):
    """8 captions, each with its own fixed 8x8 token grid; codebook 64, so chance is 1/64.

    After 300 steps of 16 samples (tiny U-ViT, ~7 passes over 650 rows) masked-token
    accuracy must exceed 0.5: 32x chance, reachable only by reading the caption, since a
    masked token's neighbours do not determine it (the grids are independent draws).
    Also counts, at the model's input, the samples whose caption was dropped.
    """
    seen = {"dropped": 0, "total": 0}

    def counting_build(preset, pretrained=None):
        model = build_model(preset, pretrained)

        def hook(module, args):
            hidden = args[1]
            dropped = (hidden == 0).flatten(1).all(1)  # the synthetic empty prompt is all zeros
            seen["dropped"] += int(dropped.sum())
            seen["total"] += len(dropped)
        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(uvit_task, "build_model", counting_build)
    cfg = config(tmp_path / "run", tokens, steps=300, optim={"lr": 1e-2, "warmup_steps": 20},
                 checkpoint={"every": 300}, log={"every": 50, "progress": False})
    result = train(parse_config(cfg))
    first, last = metrics(tmp_path / "run")[0], result.last_metrics
    assert last["masked_accuracy"] > 0.5 and last["loss"] < first["loss"] - 1, (first, last)
    assert seen["total"] == 300 * 16
    assert seen["dropped"] / seen["total"] == pytest.approx(0.1, abs=0.015)
    assert set(last) >= {"loss", "masked_accuracy", "lr", "grad_norm", "samples_per_s", "tokens_per_s"}
    assert (Path(result.checkpoint) / "ema.safetensors").exists()
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 1000


@pytest.mark.gpu
def test_bf16_steps_on_a_gpu(tmp_path, tokens):
    result = train(parse_config(config(tmp_path / "run", tokens, steps=10, checkpoint={"every": 10})))
    state = Checkpoint.at(result.checkpoint).state_dict(ema=False)
    assert next(iter(state.values())).dtype == torch.bfloat16  # precision "auto" = bf16 on a GPU
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "run"))


def test_rerun_ignores_and_removes_a_checkpoint_without_marker(tmp_path, tokens, capsys):
    run_dir = tmp_path / "run"
    keep2 = {"every": 5, "keep": 2}
    train(parse_config(config(run_dir, tokens, steps=10, checkpoint=keep2)))
    half_written = run_dir / "checkpoints" / "step_00000013"
    half_written.mkdir()
    (half_written / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="global_batch_size=32 but the run's checkpoints were made with 16"):
        train(parse_config(config(run_dir, tokens, steps=20, data__global_batch_size=32, checkpoint=keep2)))
    result = train(parse_config(config(run_dir, tokens, steps=20, checkpoint=keep2)))
    assert result.resumed_from == 10 and result.step == 20
    assert not half_written.exists()
    assert "incomplete: step_00000013" in capsys.readouterr().err
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000015", "step_00000020"]
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 21))
    # The config is snapshotted with the run and with each checkpoint.
    assert "steps: 20" in (run_dir / "config.yaml").read_text()
    assert np.isfinite(json.loads((run_dir / "result.json").read_text())["last_metrics"]["loss"])



def test_a_run_without_a_final_checkpoint_keeps_only_the_periodic_ones(tmp_path, tokens):
    run_dir = tmp_path / "run"
    result = train(parse_config(config(run_dir, tokens, steps=7, checkpoint={"every": 5, "at_end": False})))
    assert result.step == 7 and result.checkpoint == str(run_dir / "checkpoints" / "step_00000005")
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000005"]
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 8))

# ---------------------------------------------------------------- process group

_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_a_one_rank_group_lives_only_for_its_call_and_leaves_the_environment_alone(monkeypatch):
    for name in _LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    assert in_process_group(lambda: (dist.get_rank(), dist.get_world_size(), os.environ["LOCAL_RANK"])) == (0, 1, "0")
    assert not dist.is_initialized()
    assert not any(name in os.environ for name in _LAUNCH_ENV)
    with pytest.raises(KeyError):
        with process_group():
            raise KeyError("a failing training")
    assert not dist.is_initialized()
    assert not any(name in os.environ for name in _LAUNCH_ENV)


def test_a_group_from_the_launchers_environment_is_joined_and_ended(monkeypatch):
    launch = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())}
    for name, value in launch.items():
        monkeypatch.setenv(name, value)
    with process_group():
        assert dist.get_world_size() == 1
    assert not dist.is_initialized()
    assert {name: os.environ[name] for name in launch} == launch
