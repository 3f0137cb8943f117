"""The training's GPU paths, as far as a CPU can check them (the rest is marked gpu):
attention through PyTorch's scaled-dot-product kernels, fused AdamW on CUDA, a compiled
U-ViT whose checkpoints are the uncompiled one's, pinned batches for the copy to the GPU."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from amused.demo.datasets import write_token_dataset
from amused.pipeline.shards import TokenDataset
from amused.training.checkpoint import Checkpoint
from amused.training.config import OptimConfig, parse_config
from amused.training.optim import build_optimizer
from amused.training.uvit.data import ShardReader
from amused.training.uvit.model import build_model
from amused.training.uvit.task import train


def _inputs(model, batch: int = 2, device="cpu", dtype=torch.float32):
    c = model.config
    g = torch.Generator().manual_seed(0)
    return (torch.randint(0, c.vocab_size, (batch, c.sample_size, c.sample_size), generator=g).to(device),
            torch.randn(batch, 77, c.encoder_hidden_size, generator=g).to(device, dtype),
            torch.randn(batch, c.cond_embed_dim, generator=g).to(device, dtype),
            torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0]] * batch).to(device, dtype))


@pytest.mark.unit
def test_every_attention_of_the_uvit_runs_through_scaled_dot_product_attention(monkeypatch):
    model = build_model("tiny")
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    assert attentions and all(isinstance(m.processor, AttnProcessor2_0) for m in attentions)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counted(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    with torch.no_grad():
        model(*_inputs(model))
    # Every attention module once per forward, none with a mask (which would rule out flash attention).
    assert len(calls) == len(attentions) and all(mask is None for mask in calls)


@pytest.mark.unit
def test_adamw_is_fused_for_cuda_and_the_default_one_on_the_cpu():
    def fused(device: str):
        params = [torch.nn.Parameter(torch.ones(3))]  # still on the CPU, as DeepSpeed gets them
        return build_optimizer(OptimConfig(), [{"params": params, "weight_decay": 0.0}], device).defaults["fused"]

    assert fused("cuda") is True
    assert fused("cpu") is None  # torch's default, as the CPU figures were made with


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("fast") / "tokens")
    write_token_dataset(url, [64])
    return url


def _train(run_dir: Path, tokens: str, **model) -> tuple[list[float], Checkpoint]:
    result = train(parse_config({
        "run_dir": str(run_dir), "steps": 3, "seed": 0,
        "data": {"dataset": tokens, "global_batch_size": 8, "micro_batch_size": 8, "workers": 0},
        "model": {"preset": "tiny", **model}, "optim": {"lr": 3e-3, "warmup_steps": 1},
        "checkpoint": {"every": 3}, "log": {"every": 1, "progress": False}}))
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return losses, Checkpoint.at(result.checkpoint)


def test_a_compiled_uvit_trains_like_the_plain_one_and_its_checkpoints_have_the_same_names(tmp_path, tokens):
    import torch._dynamo
    from torch._dynamo.utils import counters

    plain_losses, plain = _train(tmp_path / "plain", tokens)
    torch._dynamo.reset()
    counters.clear()
    compiled_losses, compiled = _train(tmp_path / "compiled", tokens, compile=True)
    # Both transformer layers ran compiled, from one graph: the second reused the first's.
    assert counters["stats"]["unique_graphs"] == 1 and counters["stats"]["calls_captured"] > 0
    # Inductor fuses and reorders float sums: the same steps up to rounding.
    assert compiled_losses == pytest.approx(plain_losses, rel=1e-4)
    for ema in (False, True):
        want, got = plain.state_dict(ema=ema), compiled.state_dict(ema=ema)
        assert list(got) == list(want)  # no `_orig_mod.` prefixes: loads, exports and resumes as before
        assert all(torch.allclose(got[k], want[k], rtol=1e-3, atol=1e-5) for k in want)


@pytest.mark.gpu
def test_the_uvit_in_bf16_on_a_gpu_attends_with_a_fused_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = build_model("tiny").to("cuda", torch.bfloat16)
    # Without the math fallback: a shape or mask no fused kernel takes raises here.
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        model(*_inputs(model, device="cuda", dtype=torch.bfloat16)).float().mean().backward()


@pytest.mark.gpu
def test_batches_for_a_gpu_are_pinned_also_across_windows_and_lanes(tmp_path):
    url = str(tmp_path / "tokens")
    write_token_dataset(url, [120])
    # Two lanes on one rank and windows of 12 rows that batches of 8 straddle: copies, not views.
    reader = ShardReader(TokenDataset(url), lanes=2, rank=0, world_size=1, lane_batch=8, accum=1, window_rows=12,
                         seed=0, pin_memory=True)
    for _ in range(6):
        assert all(t.is_pinned() for t in next(reader).values())
    reader.close()
