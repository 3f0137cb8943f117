"""The compact text mode (pretokenize `text: ids`): the dataset stores the captions' CLIP
token ids and the training step runs the frozen text tower on them. The same input in
both modes gives the same per-step losses for the same weights, and far fewer bytes per
sample; ids without a text encoder fail at start-up; an ids run resumes exactly."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from amused.demo.datasets import write_shape_shards
from amused.orchestration.run_config import parse_run_config
from amused.pipeline import shards as fmt
from amused.pipeline.inspect import verify_dataset
from amused.pipeline.pretokenize import PretokenizeConfig, pretokenize
from amused.tokenizer.text import TextEncoder, load_tokenizer
from amused.training.checkpoint import Checkpoint
from amused.training.config import parse_config
from amused.training.uvit.objective import draw_masks
from amused.training.uvit.task import train
from tests.samples import demo_config

RES = 64
ROWS = 24
# Per-step losses of the two modes agree to this relative tolerance (see the test).
LOSS_RTOL = 1e-5


@pytest.fixture(scope="module")
def datasets(ray_session, tiny_models, tmp_path_factory) -> dict[str, str]:
    """The same 24 shape images pretokenized with text "states" and with text "ids"."""
    root = tmp_path_factory.mktemp("text_modes")
    write_shape_shards(str(root / "src"), shards=2, per_shard=ROWS // 2, seed=6)
    out = {}
    for mode in fmt.TEXT_MODES:
        out[mode] = str(root / mode)
        report = pretokenize(PretokenizeConfig(
            input=str(root / "src"), output=out[mode], vqgan=str(tiny_models / "vqgan"), text_encoder=str(tiny_models),
            resolution=RES, batch_size=4, progress=False, text=mode))
        assert report.ok and report.rows_written == ROWS, report.summary()
    return out


def train_config(run_dir: Path, dataset: str, tiny_models: Path, steps: int, **model) -> dict:
    return {"run_dir": str(run_dir), "steps": steps, "seed": 0,
            "data": {"dataset": dataset, "global_batch_size": 8, "micro_batch_size": 4, "workers": 0},
            "model": {"preset": "tiny", "vqgan": str(tiny_models / "vqgan"), "text_encoder": str(tiny_models),
                      **model},
            # Half the captions dropped: the empty prompt's path is taken in every step.
            "objective": {"cond_drop_prob": 0.5}, "optim": {"lr": 3e-3, "warmup_steps": 2},
            "checkpoint": {"every": 2}, "log": {"every": 1, "progress": False}}


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stored_bytes(dataset: str) -> dict[str, int]:
    """Compressed bytes of each column over all shards (Parquet column-chunk sizes)."""
    out: dict[str, int] = {}
    for shard in fmt.TokenDataset(dataset).shards:
        meta = pq.ParquetFile(Path(dataset) / shard.name).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                chunk = meta.row_group(g).column(c)
                out[chunk.path_in_schema] = out.get(chunk.path_in_schema, 0) + chunk.total_compressed_size
    return out


def test_ids_dataset_stores_the_tokenizers_ids_and_is_smaller(datasets, tiny_models):
    states, ids = fmt.TokenDataset(datasets["states"]), fmt.TokenDataset(datasets["ids"])
    assert (states.spec.text, ids.spec.text) == ("states", "ids")
    assert verify_dataset(datasets["ids"]).ok
    # Everything but the text mode is the same dataset: shapes and model identities included.
    assert states.spec.changes_to(ids.spec) == ["text: 'states' -> 'ids'"]
    a, b = (next(d.iter_batches(batch_size=1000)) for d in (states, ids))
    assert "text_ids" in b and "text_hidden_states" not in b and "text_pooled" not in b
    assert a["key"] == b["key"] and a["caption"] == b["caption"]
    np.testing.assert_array_equal(a["image_tokens"], b["image_tokens"])
    encoder = TextEncoder.from_pretrained(tiny_models, device="cpu")
    np.testing.assert_array_equal(b["text_ids"], encoder.token_ids(b["caption"]).numpy())
    # The empty prompt's file belongs to states; training computes it for ids.
    assert fmt.read_empty_prompt(datasets["states"]) is not None and fmt.read_empty_prompt(datasets["ids"]) is None

    # Here 77 x 32 float16 states + 32 pooled (4,992 B raw) against 77 uint16 ids (154 B):
    # 32x raw. At 256 px with CLIP-L/14 (77 x 768) it is 118 KB against 154 B
    # (benchmarks/bytes_per_sample.py).
    sa, sb = stored_bytes(datasets["states"]), stored_bytes(datasets["ids"])
    text_states, text_ids = sa["text_hidden_states"] + sa["text_pooled"], sb["text_ids"]
    assert text_states > 10 * text_ids, (text_states, text_ids)
    total = {m: sum(s.bytes for s in fmt.TokenDataset(u).shards) for m, u in datasets.items()}
    assert total["states"] > 3 * total["ids"], total


def test_both_modes_train_to_the_same_losses_and_ids_resume_exactly(datasets, tiny_models, tmp_path):
    """Same seed, same samples, same tower weights. The states were computed by pretokenize on
    sorted unique captions of a 4-image chunk, the ids mode's by the training step on its
    micro-batch: float32 matrix products over other batch shapes may round differently in
    the last bit, which float16 storage hides nearly always, and a value rounding to a
    neighbouring float16 moves a loss by ~1e-7 relative. LOSS_RTOL = 1e-5 leaves room for
    that and is far below what one training step changes (~1e-1 here). Measured: the losses agree bit for bit."""
    steps = 4
    runs = {mode: tmp_path / mode for mode in datasets}
    results = {mode: train(parse_config(train_config(runs[mode], datasets[mode], tiny_models, steps)))
               for mode in datasets}
    got = {mode: losses(run) for mode, run in runs.items()}
    assert len(got["ids"]) == steps and all(np.isfinite(got["ids"]))
    np.testing.assert_allclose(got["ids"], got["states"], rtol=LOSS_RTOL, atol=0)
    assert abs(got["states"][-1] - got["states"][0]) > 100 * LOSS_RTOL * got["states"][0]  # the steps differ
    dropped = [draw_masks(0, step, 1, 8, (8, 8), 0.15, 0.5).drop_cond.sum() for step in range(1, steps + 1)]
    assert all(0 < int(d) < 8 for d in dropped)  # each step mixes captions and the empty prompt

    # The tower is in neither the checkpoint nor the optimizer: same files, same sizes.
    ckpt = {m: Checkpoint.at(r.checkpoint) for m, r in results.items()}
    assert set(ckpt["ids"].state_dict(ema=False)) == set(ckpt["states"].state_dict(ema=False))
    sizes = {m: {p.name: p.stat().st_size for p in Path(r.checkpoint).glob("*optim_states.pt")}
             for m, r in results.items()}
    assert sizes["ids"] and sizes["ids"] == sizes["states"]

    # Resume in ids mode: a run stopped at its step-2 checkpoint continues with the same losses.
    resumed = tmp_path / "resumed"
    train(parse_config(train_config(resumed, datasets["ids"], tiny_models, 2)))
    result = train(parse_config(train_config(resumed, datasets["ids"], tiny_models, steps)))
    assert result.resumed_from == 2 and result.step == steps
    assert losses(resumed) == got["ids"]


def test_ids_without_a_text_encoder_fails_at_start_up(datasets, tiny_models, tmp_path):
    cfg = train_config(tmp_path / "run", datasets["ids"], tiny_models, 2, text_encoder=None)
    with pytest.raises(ValueError, match=r"^model.text_encoder is required: .* stores caption token ids"):
        train(parse_config(cfg))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    # A tower other than the dataset's is refused as in states mode.
    cfg = train_config(tmp_path / "run2", datasets["ids"], tiny_models, 2, text_encoder=str(tiny_models / "vqgan"))
    with pytest.raises(ValueError, match="model.text_encoder = .* is not the model the token dataset was made with"):
        train(parse_config(cfg))


def test_ids_refuse_a_vocabulary_beyond_uint16_at_start_up(ray_session, tiny_models, datasets, tmp_path):
    models = tmp_path / "big-vocab"
    shutil.copytree(tiny_models / "text_encoder", models / "text_encoder")
    tokenizer = load_tokenizer(tiny_models)
    tokenizer.add_tokens([f"extra{i}" for i in range(65_536 + 1 - len(tokenizer))])
    tokenizer.save_pretrained(models / "tokenizer")
    out = tmp_path / "out"
    cfg = PretokenizeConfig(input=str(Path(datasets["ids"]).parent / "src"), output=str(out),
                            vqgan=str(tiny_models / "vqgan"), text_encoder=str(models), resolution=RES,
                            progress=False, text="ids")
    with pytest.raises(ValueError, match=r"^text: 'ids' stores token ids as uint16, but the tokenizer of .* has "
                                         r"65,537 tokens; use text: states$"):
        pretokenize(cfg)
    assert not out.exists() or not any(out.iterdir())


def test_pretokenize_refuses_an_unknown_text_mode(tiny_models, tmp_path):
    with pytest.raises(ValueError, match=r"text: 'tokens' is not allowed; expected states or ids"):
        PretokenizeConfig(input=str(tmp_path), output=str(tmp_path / "out"), vqgan=str(tiny_models / "vqgan"),
                          text_encoder=str(tiny_models), text="tokens")


def test_the_run_config_chooses_the_mode_and_train_gets_the_text_encoder(tmp_path):
    cfg = demo_config(tmp_path / "run", port=8765)
    cfg["pretokenize"] = {**cfg["pretokenize"], "text": "ids"}
    run = parse_run_config(cfg)
    assert run.pretokenize.text == "ids"
    assert run.train.model.text_encoder == str(tmp_path / "run" / "models")  # derived, as for states
    with pytest.raises(ValueError, match="pretokenize.text: 'tokens' is not one of 'states', 'ids'"):
        parse_run_config({**cfg, "pretokenize": {**cfg["pretokenize"], "text": "tokens"}})
