"""LoRA training (training/lora.py): only the adapters train and are checkpointed, exact
resume, the universal form, and the refusals (no base, another base, another setting)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict

from amused.demo.datasets import write_token_dataset
from amused.training import checkpoint as ckpt
from amused.training.checkpoint import Checkpoint
from amused.training.config import LoraConfig, parse_config
from amused.training.distributed import in_process_group
from amused.training.engine import run_loop
from amused.training.lora import adapter_state_dict, apply_lora, is_adapter, load_adapters, load_trained
from amused.training.uvit import task as uvit_task
from amused.training.uvit.model import build_model
from amused.training.uvit.task import train
from tests.test_train_dist import LOSS_RTOL, run, torchrun, write_config
from tests.test_train_dist import losses as dist_losses

LORA = {"enabled": True, "rank": 4, "alpha": 8.0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model gains nothing from a second thread, and on a loaded machine loses much to spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """One token grid for every caption: something a few adapters on the attention learn in 40 steps."""
    url = str(tmp_path_factory.mktemp("lora") / "tokens")
    write_token_dataset(url, [160, 96], classes=1)
    return url


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny U-ViT in a pipeline folder's layout (transformer/), the base the adapters train on."""
    folder = tmp_path_factory.mktemp("base") / "pipe"
    torch.manual_seed(1)
    build_model("tiny").save_pretrained(folder / "transformer")
    return folder


def config(run_dir, dataset, pretrained, **over):
    cfg = {"run_dir": str(run_dir), "steps": 6, "seed": 0,
           "data": {"dataset": dataset, "global_batch_size": 16, "micro_batch_size": 8, "workers": 0},
           "model": {"preset": "tiny", "pretrained": str(pretrained)}, "lora": LORA,
           "optim": {"lr": 1e-2, "warmup_steps": 1}, "ema": {"decay": 0.5},
           "checkpoint": {"every": 3}, "log": {"every": 1, "progress": False}}
    cfg.update(over)
    return parse_config(cfg)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def model_states(folder) -> dict:
    return torch.load(Path(folder) / ckpt.MODEL_STATES, weights_only=True, map_location="cpu")


def test_only_the_adapters_train_and_only_they_are_checkpointed(tmp_path, tokens, base, monkeypatch):
    built = []

    def keeping_build(preset, pretrained=None):
        built.append(build_model(preset, pretrained))
        return built[-1]

    def run_40(name: str, lr: float):
        return train(config(tmp_path / name, tokens, base, steps=40, checkpoint={"every": 40},
                            optim={"lr": lr, "warmup_steps": 1}, log={"every": 10, "progress": False}))

    # Against adapters that do not move, on the same batches and masks (same seed): the loss's
    # own noise from step to step cancels out. The adapters learn most in the first 10 steps
    # (4.39 -> ~4.17 here), so a run's first 10 against its last 10 was a margin of ~0.1 only.
    run_40("still", 1e-9)
    monkeypatch.setattr(uvit_task, "build_model", keeping_build)
    result = run_40("run", 5e-2)
    still, trained = losses(tmp_path / "still")[-1], losses(tmp_path / "run")[-1]  # means over steps 31-40
    assert trained < still - 0.2, (still, trained)

    model, pretrained = built[0], build_model("tiny", str(base)).state_dict()
    trained = {n: p for n, p in model.named_parameters() if is_adapter(n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trained) and trained
    for name, value in model.state_dict().items():  # the base, byte for byte
        if not is_adapter(name):
            assert torch.equal(value, pretrained[name.replace(".base_layer.", ".")]), name
    assert all(t.abs().max() > 0 for n, t in trained.items() if ".lora_B." in n)  # lora_B starts at zero

    # The checkpoint holds the adapters (and their optimizer state) only, the EMA too.
    folder = Path(result.checkpoint)
    assert set(model_states(folder)["module"]) == set(trained)
    assert set(Checkpoint.at(folder).state_dict(ema=True)) == set(trained)
    optim = torch.load(folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False, map_location="cpu")
    flat = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    assert sum(t.numel() for t in flat) == sum(t.numel() for t in trained.values())
    lora = json.loads((folder / ckpt.TRAINER).read_text())["lora"]
    assert lora["rank"] == 4 and lora["base"]["path"].endswith("pipe/transformer") and len(lora["base"]["sha256"]) == 64

    # Read back as a model: the base plus the checkpoint's adapters, the names peft and diffusers use.
    again = load_trained(Checkpoint.at(folder), ema=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in again.state_dict().items())
    ours = adapter_state_dict(again)
    assert ours.keys() == get_peft_model_state_dict(again).keys()
    assert all(".default." not in n and n.endswith(("lora_A.weight", "lora_B.weight")) for n in ours)


@pytest.mark.parametrize("zero_stage", [0, 1, 2])
def test_resume_is_exact(tmp_path, tokens, base, zero_stage):
    engine = {"zero_stage": zero_stage}
    straight = train(config(tmp_path / "straight", tokens, base, engine=engine))
    train(config(tmp_path / "split", tokens, base, steps=3, engine=engine))
    resumed = train(config(tmp_path / "split", tokens, base, engine=engine))
    assert resumed.resumed_from == 3 and resumed.step == 6
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a, b = Checkpoint.at(straight.checkpoint), Checkpoint.at(resumed.checkpoint)
    for ema in (False, True):
        sa, sb = a.state_dict(ema), b.state_dict(ema)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    states = model_states(b.folder)
    assert states["module"] and all(is_adapter(n) for n in states["module"])
    if zero_stage == 0:  # the optimizer's state lives in the model states: the adapters' only
        assert len(states["optimizer"]["state"]) == len(states["module"])


def test_activation_checkpointing_keeps_the_adapters_losses(tmp_path, tokens, base):
    plain = train(config(tmp_path / "plain", tokens, base, steps=4, checkpoint={"every": 4}))
    model = {"preset": "tiny", "pretrained": str(base), "activation_checkpointing": True}
    recomputed = train(config(tmp_path / "ckpt", tokens, base, steps=4, checkpoint={"every": 4}, model=model))
    assert losses(tmp_path / "ckpt") == losses(tmp_path / "plain")
    a, b = (Checkpoint.at(r.checkpoint).state_dict(ema=False) for r in (plain, recomputed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


def test_a_text_ids_dataset_feeds_the_adapters_through_the_frozen_tower(tmp_path, base, tiny_models):
    url = str(tmp_path / "ids")
    write_token_dataset(url, [32], classes=1, text_seq_len=77, text_encoder=str(tiny_models))
    model = {"preset": "tiny", "pretrained": str(base), "text_encoder": str(tiny_models)}
    result = train(config(tmp_path / "run", url, base, steps=3, model=model))
    state = Checkpoint.at(result.checkpoint).state_dict(ema=False)
    assert state and all(is_adapter(n) for n in state)  # the tower is neither trained nor saved


def test_nonfinite_steps_are_skipped_with_adapters(tmp_path, base):
    url = str(tmp_path / "nan-tokens")
    write_token_dataset(url, [64], classes=1, nan_rows=(5,))
    result = train(config(tmp_path / "run", url, base, steps=8, checkpoint={"every": 8}))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["nonfinite_skipped"] for r in lines) == 2  # row 5 once per epoch of 4 steps
    for ema in (False, True):
        state = Checkpoint.at(result.checkpoint).state_dict(ema)
        assert state and all(is_adapter(n) and torch.isfinite(t).all() for n, t in state.items())


def test_universal_form_resumes_without_the_base(tmp_path, tokens, base):
    """The conversion a resume on another number of ranks goes through, on the adapters-only
    checkpoint; forced on one rank here (tests/test_train_dist.py changes the ranks)."""
    straight = config(tmp_path / "straight", tokens, base)
    train(straight)
    cfg = config(tmp_path / "split", tokens, base)
    train(config(tmp_path / "split", tokens, base, steps=3))

    def universal_resume():
        task, resume = uvit_task.start(cfg, torch.device("cpu"), torch.float32)
        return run_loop(cfg, task, resume, True, torch.device("cpu"), False)

    result = in_process_group(universal_resume)
    assert result.resumed_from == 3
    converted = Path(cfg.run_dir) / "checkpoints" / ckpt.UNIVERSAL / ckpt.tag(3)
    assert (converted / ckpt.MARKER).exists()
    params = {p.name for p in (converted / "zero").iterdir() if p.is_dir()}
    assert params and all(is_adapter(p) for p in params)
    assert losses(cfg.run_dir) == pytest.approx(losses(straight.run_dir), rel=1e-5)


def test_adapters_refuse_another_base_or_setting(tmp_path, tokens, base):
    run = tmp_path / "run"
    train(config(run, tokens, base, steps=3))
    other = tmp_path / "other"
    shutil.copytree(base, other)
    torch.manual_seed(2)
    build_model("tiny").save_pretrained(other / "transformer")
    with pytest.raises(ValueError, match="adapters load only onto their own base"):
        train(config(run, tokens, other))
    with pytest.raises(ValueError, match="lora.rank was 4, now 8"):
        train(config(run, tokens, base, lora={**LORA, "rank": 8}))
    with pytest.raises(ValueError, match="trained with LoRA adapters; lora.enabled must stay True"):
        train(config(run, tokens, base, lora={"enabled": False}))
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["step"] == 3  # nothing trained on

    # A checkpoint's adapters onto another base: refused when read as well.
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(base / "transformer")
    shutil.copytree(other / "transformer", base / "transformer")
    try:
        with pytest.raises(ValueError, match="adapters load only onto their own base"):
            load_trained(Checkpoint.latest(moved))
    finally:
        torch.manual_seed(1)
        build_model("tiny").save_pretrained(base / "transformer")


def test_load_adapters_refuses_what_does_not_fit():
    torch.manual_seed(0)
    model = apply_lora(build_model("tiny"), LoraConfig(rank=4))
    state = adapter_state_dict(model)
    other = apply_lora(build_model("tiny"), LoraConfig(rank=4))
    load_adapters(other, state)
    assert all(torch.equal(t, adapter_state_dict(other)[n]) for n, t in state.items())
    with pytest.raises(ValueError, match="1 missing"):
        load_adapters(other, dict(list(state.items())[1:]))
    with pytest.raises(ValueError, match="1 unexpected"):
        load_adapters(other, {**state, "transformer_layers.0.attention.to_q.base_layer.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="another lora.rank"):
        load_adapters(apply_lora(build_model("tiny"), LoraConfig(rank=2)), state)


@pytest.mark.slow
def test_resume_on_fewer_ranks_through_the_universal_form(tmp_path, tokens, base):
    """A 2-rank LoRA run's step-3 checkpoint resumed on 1 rank (torchrun, as a user launches it)."""
    lora = {"model": {"preset": "tiny", "pretrained": str(base)}, "lora": LORA, "steps": 6,
            "checkpoint": {"every": 3, "keep": 5}, "data__workers": 0}
    run(torchrun(2, write_config(tmp_path, "straight", tokens, **lora)))
    shutil.copytree(tmp_path / "straight", tmp_path / "fewer")
    shutil.rmtree(tmp_path / "fewer" / "checkpoints" / "step_00000006")
    stdout, = run(torchrun(1, write_config(tmp_path, "fewer", tokens, data__micro_batch_size=16, **lora)))
    assert "resumed from step 3" in stdout
    assert (tmp_path / "fewer" / "checkpoints" / ckpt.UNIVERSAL / ckpt.tag(3) / ckpt.MARKER).exists()
    a, b = dist_losses(tmp_path / "straight"), dist_losses(tmp_path / "fewer")
    assert sorted(b) == list(range(1, 7))
    for step in range(4, 7):
        assert b[step] == pytest.approx(a[step], rel=LOSS_RTOL), step
    sa, sb = (Checkpoint.at(tmp_path / name / "checkpoints" / ckpt.tag(6)).state_dict(ema=False)
              for name in ("straight", "fewer"))
    assert sa.keys() == sb.keys() and all(is_adapter(n) for n in sa)
    for name in sa:
        torch.testing.assert_close(sb[name], sa[name], rtol=1e-4, atol=1e-6)
