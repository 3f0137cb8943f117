"""`amused compare RUN_A RUN_B`: do two runs of a config agree, stage by stage, and which
stage is the first whose outputs differ (the question behind `deterministic: true`).

Every file of each stage's outputs and its state record is reduced to what two runs must
agree on: its sha256, or for records the parsed content without clock readings. The two
runs must have been written at the same path (move the first away before the second
starts): paths are part of what the stages record, so runs made in two folders differ in
their records and job ids even where every image, token and weight agrees. A data_dir
written inside the run folder moves with it; one outside it is where both configs name it,
which `compare_runs` refuses (each run would be compared with itself there).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass

import pyarrow.parquet as pq
from tqdm import tqdm

from amused.orchestration.run import read_run_config, read_state
from amused.orchestration.stages import STAGES
from amused.plumbing.storage import join, url_to_fs

# What is not compared byte for byte, and why (paths inside a stage's output folder):
#   logs/ at any depth           Ray's and img2dataset's logs (timestamps)
#   ray/ of train                Ray Train's own run record (ids, times)
#   tensorboard/, wandb/, wandb_id of the trainings: event files named and stamped with the
#                                time and host; wandb's random run id and its local folder
#   progress.json                the live progress record (a launch id, times)
#   _amused/records.parquet      download's shard records of records/*.json again, in one table
# Compared without what a run reads off its clock or its cluster (`VARYING`, keys at any
# depth): the stage states (and their attempt count: a resumed stage's files must still
# agree), the trainings' metrics lines and results, the filter report, img2dataset's stats
# and the download's records (which node fetched a shard: a Ray node id is new on every
# cluster start). img2dataset's per-shard tables (NNNNN.parquet beside the tars) list the
# samples in the order its threads finished them (the tar is rewritten in key order):
# compared sorted by key.
VARYING = frozenset({"started", "finished", "seconds", "seconds_before", "duration", "start_time", "end_time",
                     "wall_seconds", "samples_per_s", "tokens_per_s", "checkpoint_s", "attempts", "node"})
_TRAINING_LOGS = ("ray/", "tensorboard/", "wandb/", "wandb_id")
_SKIPPED = {"download": ("_amused/records.parquet",), "train": _TRAINING_LOGS, "vqgan": _TRAINING_LOGS}
_KEY_ORDERED = {"download": re.compile(r"\d+\.parquet")}


def invariant(value):
    """A parsed record without its `VARYING` keys."""
    if isinstance(value, dict):
        return {k: invariant(v) for k, v in value.items() if k not in VARYING}
    if isinstance(value, list):
        return [invariant(v) for v in value]
    return value


def _digest(stage: str, rel: str, fs, path: str) -> str | None:
    """What a file holds that two runs must agree on, as one sha256; None: not compared."""
    parts = rel.split("/")
    if "logs" in parts[:-1] or parts[-1] == "progress.json" or rel.startswith(_SKIPPED.get(stage, ())):
        return None
    if rel.endswith(".jsonl"):
        content = [invariant(json.loads(line)) for line in fs.cat_file(path).decode().splitlines() if line.strip()]
    elif rel.endswith(".json"):
        content = invariant(json.loads(fs.cat_file(path)))
    elif stage in _KEY_ORDERED and _KEY_ORDERED[stage].fullmatch(rel):
        content = pq.read_table(io.BytesIO(fs.cat_file(path))).sort_by("key").to_pylist()
    else:
        digest = hashlib.sha256()
        with fs.open(path, "rb") as fh:  # weights of many GB: in pieces
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        return digest.hexdigest()
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def run_contents(run_dir: str) -> dict[str, dict[str, str]]:
    """Per stage that ran (in stage order): relative path -> digest of its output files and
    of its state record (`stages/NAME.json`); a run folder on any fsspec URL."""
    cfg = read_run_config(run_dir)
    files = []  # (stage, key, path inside the stage's folder, file system, path)
    for stage in STAGES:
        if not stage.enabled(cfg):
            continue
        fs, record = url_to_fs(join(run_dir, "stages", f"{stage.name}.json"))
        files += [(stage.name, f"stages/{stage.name}.json", "state.json", fs, record)] if fs.exists(record) else []
        done = (read_state(run_dir, stage.name) or {}).get("status") == "done"
        for i, folder in enumerate(stage.outputs(cfg)):  # a list by the Stage contract; one folder today
            fs, root = url_to_fs(folder)
            if not fs.exists(root):
                if done:  # else two runs missing it would "agree" on nothing
                    raise FileNotFoundError(f"{run_dir}: stage {stage.name} is done but its output {folder} is "
                                            f"missing (a data_dir moved elsewhere, or a relative one read from "
                                            f"another working folder)")
                continue
            cut = len(root.rstrip("/")) + 1
            for path in sorted(fs.find(root)):
                files.append((stage.name, f"{i}:" * bool(i) + path[cut:], path[cut:], fs, path))
    contents: dict[str, dict[str, str]] = {stage.name: {} for stage in STAGES if stage.enabled(cfg)}
    for stage, key, rel, fs, path in tqdm(files, desc=f"hash {run_dir}", unit="file", leave=False):
        found = _digest(stage, rel, fs, path)
        if found is not None:
            contents[stage][key] = found
    return contents


@dataclass
class StageComparison:
    stage: str
    files: int  # compared in either run
    differing: list[str]  # relative paths that differ or exist in one run only


def _folders(run_dir: str) -> list[str]:
    """The run's output folders as full URLs with a closing slash (file:///x/, s3://b/x/)."""
    cfg = read_run_config(run_dir)
    urls = []
    for stage in STAGES:
        for folder in stage.outputs(cfg) if stage.enabled(cfg) else []:
            fs, path = url_to_fs(folder)
            urls.append(fs.unstrip_protocol(path).rstrip("/") + "/")
    return urls


def compare_runs(a: str, b: str) -> list[StageComparison]:
    theirs = _folders(b)
    shared = [x for x in _folders(a) for y in theirs if x.startswith(y) or y.startswith(x)]
    if shared:  # each run would be compared with itself there
        raise ValueError(f"both runs keep outputs in {shared[0]}: a data_dir outside the run folder is where both "
                         f"configs name it; compare runs whose outputs are apart")
    first, second = run_contents(a), run_contents(b)
    out = []
    for stage in [s.name for s in STAGES if s.name in first or s.name in second]:
        x, y = first.get(stage, {}), second.get(stage, {})
        out.append(StageComparison(stage, len(x.keys() | y.keys()),
                                   sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))))
    return out


def compare(run_a: str, run_b: str) -> int:
    """Prints each stage's comparison and the first stage that differs; 0 when every
    compared file agrees, 1 otherwise (the Python API and the CLI)."""
    rows = compare_runs(run_a, run_b)
    width = max(len(r.stage) for r in rows)
    for r in rows:
        shown = ", ".join(r.differing[:3]) + (f" (+{len(r.differing) - 3})" if len(r.differing) > 3 else "")
        print(f"{r.stage.ljust(width)}  {r.files:6d} files  " + (f"{len(r.differing)} differ: {shown}"
                                                                  if r.differing else "same"))
    differing = [r for r in rows if r.differing]
    print(f"first stage that differs: {differing[0].stage}" if differing
          else f"the two runs agree in every compared file ({sum(r.files for r in rows)})")
    return 1 if differing else 0
