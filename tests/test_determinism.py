"""`deterministic: true`: the scaled-down demo run twice, each time from an empty folder
(the same path, the same image server port: both are written into what the stages store),
writes the same bytes in every stage's outputs."""

import json

from amused.orchestration.cli import main
from amused.orchestration.compare import compare_runs, run_contents
from amused.orchestration.run import run
from amused.orchestration.run_config import parse_run_config
from tests.samples import demo_config, free_port

# What is compared and what is not (logs, Ray Train's record, clock readings): orchestration/compare.py.


def test_two_deterministic_runs_write_the_same_bytes(tmp_path):
    cfg = demo_config(tmp_path / "run", port=free_port())
    assert cfg["deterministic"] is True  # the demo's own setting
    first, second = tmp_path / "first", tmp_path / "run"
    for _ in range(2):
        if second.exists():  # `amused compare` compares runs written at one path
            second.rename(first)
        states = run(parse_run_config(cfg), log=lambda line: None)
        assert all(s["status"] == "done" for s in states.values())
    rows = compare_runs(str(first), str(second))
    assert [(r.stage, r.differing) for r in rows if r.differing] == []
    assert [r.stage for r in rows] == ["source", "models", "filter", "download", "vqgan", "pretokenize", "train",
                                       "evaluate", "samples"]
    # Every stage left outputs that count: image and token shards, both trainings' weights and
    # random states, the VQ-GAN's export, the metrics, the grid; and the losses step by step.
    names = {stage: " ".join(files) for stage, files in run_contents(str(second)).items()}
    for stage, part in (("download", "00000.tar"), ("pretokenize", "00000.parquet"),
                        ("vqgan", "export/diffusion_pytorch_model"), ("vqgan", "checkpoints/step_00000004/rng/"),
                        ("train", "checkpoints/step_00000006/ema.safetensors"), ("evaluate", "step_00000006.json"),
                        ("evaluate", "reference.npz"), ("samples", "grid.png")):
        assert part in names[stage], (stage, part)
    lines = (second / "train/metrics.jsonl").read_text().splitlines()
    assert lines and all("loss" in json.loads(line) for line in lines)

    # A clock reading may differ; one byte of one token shard may not, and names its stage.
    (second / "train/metrics.jsonl").write_text("\n".join(
        json.dumps({**json.loads(line), "samples_per_s": 1.0}) for line in lines) + "\n")
    assert main(["compare", str(first), str(second)]) == 0
    shard = second / "data/tokens/00001.parquet"
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    rows = compare_runs(str(first), str(second))
    assert [(r.stage, r.differing) for r in rows if r.differing] == [("pretokenize", ["00001.parquet"])]
    assert main(["compare", str(first), str(second)]) == 1
