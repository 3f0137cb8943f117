"""`amused run CONFIG` and `amused status RUN_DIR`: the stage graph with its persisted state.

RUN_DIR/config.yaml is the snapshot of the last run's config; RUN_DIR/stages/NAME.json
holds each stage's status (running, done, failed), the fingerprint of its settings and
inputs (its own settings plus the fingerprints of the stages it reads), the settings
themselves (to say what changed), timings and counts. A stage is done only when its
state file says so with the current fingerprint. A rerun skips done stages, resumes
unfinished ones (each from its own resume points), and when a fingerprint changed it
says which settings differ, removes that stage's outputs and runs it again; the stages
after it then see a changed input fingerprint and follow. A stage turned off whose
recorded outputs a stage to run writes now (download's and ingest's image shards, when
the source's kind changes) loses them and its state the same way, with the state of the
stage that takes them over: no stage takes another's files for its own. What the stages
still to do read from outside the run (`Stage.check`: ingest's source folder) is checked
before anything is written.

A run holds RUN_DIR/run.lock (and DATA_DIR/run.lock when the data lives elsewhere) from
before it writes anything until it ends: a second run of the folder stops at once,
naming the holder, and changes nothing (plumbing/runlock.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import ExitStack
from typing import Any

import yaml

from amused.orchestration.run_config import RunConfig, parse_run_config
from amused.orchestration.stages import STAGES, Stage
from amused.plumbing.determinism import MAY_VARY
from amused.plumbing.fsio import atomic_writer, exists, read_json, write_json_atomic
from amused.plumbing.raysession import ray_session
from amused.plumbing.runlock import FolderLock
from amused.plumbing.storage import join, url_to_fs
from amused.training.config import dump_config


def _state_url(run_dir: str, name: str) -> str:
    return join(run_dir, f"stages/{name}.json")


def read_state(run_dir: str, name: str) -> dict | None:
    url = _state_url(run_dir, name)
    return read_json(url) if exists(url) else None


def read_run_config(run_dir: str) -> RunConfig:
    """The config a run folder was started with (its config.yaml, as written), with its
    run_dir the folder as named now, and a data_dir written inside it moved with it: the
    config may name them relative to another working folder, or the run may have been
    moved (`amused compare` reads a run moved aside)."""
    snapshot = join(run_dir, "config.yaml")
    if not exists(snapshot):
        raise FileNotFoundError(f"{run_dir} holds no run (no config.yaml): start one with `amused run CONFIG`")
    fs, path = url_to_fs(snapshot)
    with fs.open(path, "r") as fh:
        written = yaml.safe_load(fh)
    data_dir, inside = written.get("data_dir"), str(written["run_dir"]).rstrip("/") + "/"
    if isinstance(data_dir, str) and (data_dir.rstrip("/") + "/").startswith(inside):
        written["data_dir"] = join(run_dir, data_dir[len(inside):]) if len(data_dir) > len(inside) else run_dir
    return parse_run_config({**written, "run_dir": run_dir})


def _fingerprint(settings: Any, inputs: list[str]) -> str:
    blob = json.dumps({"settings": settings, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan(cfg: RunConfig) -> dict[str, tuple[str, Any]]:
    """(fingerprint, settings) of every enabled stage; a disabled stage's fingerprint is
    'off', so turning one on or off changes what follows it."""
    out: dict[str, tuple[str, Any]] = {}
    for stage in STAGES:
        if not stage.enabled(cfg):
            out[stage.name] = ("off", None)
            continue
        settings = json.loads(json.dumps(stage.settings(cfg), default=str))
        inputs = [out[a][0] for a in stage.after] + [out[a][0] for a in stage.late_after if out[a][0] != "off"]
        out[stage.name] = (_fingerprint(settings, inputs), settings)
    return out


def _changes(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in sorted(set(old) | set(new))
                for c in _changes(old.get(k), new.get(k), f"{where}.{k}" if where else k)]
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _remove(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _select(only: list[str] | None, start: str | None) -> set[str]:
    names = [s.name for s in STAGES]
    for name in (only or []) + ([start] if start else []):
        if name not in names:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(names)}")
    if only and start:
        raise ValueError("give --only or --from, not both")
    if only:
        return set(only)
    return set(names[names.index(start):]) if start else set(names)


def run(cfg: RunConfig, only: list[str] | None = None, start: str | None = None,
        log=print) -> dict[str, dict]:
    """Runs (or resumes) the selected stages in order; returns every stage's state."""
    selected = _select(only, start)
    with ExitStack() as locks:
        for folder in _locked_folders(cfg):
            locks.enter_context(FolderLock(join(folder, "run.lock"), log=log))
        return _run_locked(cfg, selected, log)


def _locked_folders(cfg: RunConfig) -> list[str]:
    """The run folder and the data folder, each with its own lock even when the data
    lives inside the run folder: another run may name that same folder as its
    `data_dir`, and would otherwise write the same data stages at once."""
    same = cfg.data_dir.rstrip("/") == cfg.run_dir.rstrip("/")
    return [cfg.run_dir] if same else [cfg.run_dir, cfg.data_dir]


def _done(state: dict | None, fingerprint: str) -> bool:
    return bool(state) and state["status"] == "done" and state["fingerprint"] == fingerprint


def _run_locked(cfg: RunConfig, selected: set[str], log) -> dict[str, dict]:
    planned = plan(cfg)
    for stage in STAGES:
        fingerprint = planned[stage.name][0]
        if fingerprint != "off" and stage.name in selected and not _done(read_state(cfg.run_dir, stage.name),
                                                                        fingerprint):
            stage.check(cfg)
    # The config as written (what `amused status` reads back) and with every default filled in.
    for name, text in (("config.yaml", yaml.safe_dump(cfg.given, sort_keys=False)),
                       ("config.resolved.yaml", dump_config(cfg))):
        with atomic_writer(join(cfg.run_dir, name)) as fh:
            fh.write(text.encode())
    _remove_stale(cfg, planned, selected, log)
    if not cfg.deterministic:
        log(f"[run] {MAY_VARY}")
    states: dict[str, dict] = {}
    with ray_session(cfg.ray.address or None):
        for stage in STAGES:
            fingerprint, settings = planned[stage.name]
            if fingerprint == "off":
                continue
            state = read_state(cfg.run_dir, stage.name)
            if _done(state, fingerprint):
                log(f"[{stage.name}] done ({state['seconds']:.1f}s), skipped")
                states[stage.name] = state
                continue
            if stage.name not in selected:
                unmet = [s.name for s in STAGES if s.name in selected and stage.name in _upstream(s)]
                if unmet:
                    raise RuntimeError(f"stage {unmet[0]!r} needs {stage.name!r}, which is not done with the "
                                       f"current settings; run it first (drop --only / --from)")
                continue
            states[stage.name] = _run_stage(cfg, stage, fingerprint, settings, state, log)
    return states


def _remove_stale(cfg: RunConfig, planned: dict[str, tuple[str, Any]], selected: set[str], log) -> None:
    """Removes, with their states, the outputs of the selected stages whose fingerprint
    changed, and those of a stage turned off that a selected stage writes now (and that
    stage's state, which counted them). Before any stage runs: a stage may write a later
    one's outputs early (the evaluation watcher during training), and those must survive."""
    writers = {url: s.name for s in STAGES if planned[s.name][0] != "off" and s.name in selected
               for url in s.outputs(cfg)}
    for stage in STAGES:
        fingerprint, settings = planned[stage.name]
        state = read_state(cfg.run_dir, stage.name)
        if not state:
            continue
        if fingerprint == "off":
            taken = {url: writer for url in state.get("outputs") or [] for mine, writer in writers.items()
                     if _overlap(url, mine)}
            if not taken:
                continue
            log(f"[{stage.name}] is off now, and {', '.join(sorted(set(taken.values())))} writes its outputs "
                f"({', '.join(taken)}): removing them")
            for url in taken:
                _remove(url)
            for writer in set(taken.values()):
                _remove(_state_url(cfg.run_dir, writer))
        elif stage.name in selected and state["fingerprint"] != fingerprint:
            changed = _changes(state.get("settings"), settings) or ["an input stage's output"]
            log(f"[{stage.name}] settings or inputs changed ({'; '.join(changed)}): "
                f"removing its outputs and running it again")
            for url in stage.outputs(cfg):
                _remove(url)
        else:
            continue
        _remove(_state_url(cfg.run_dir, stage.name))


def _overlap(a: str, b: str) -> bool:
    """Whether one folder is the other or holds it."""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _upstream(stage: Stage) -> set[str]:
    by_name = {s.name: s for s in STAGES}
    seen: set[str] = set()
    todo = [*stage.after, *stage.late_after]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend((*by_name[name].after, *by_name[name].late_after))
    return seen


def _run_stage(cfg: RunConfig, stage: Stage, fingerprint: str, settings: Any, previous: dict | None,
               log) -> dict:
    resumed = previous is not None
    log(f"[{stage.name}] {'resuming' if resumed else 'starting'}")
    # The outputs from the start: a stage that another takes the place of loses what it began.
    state = {"stage": stage.name, "status": "running", "fingerprint": fingerprint, "settings": settings,
             "outputs": stage.outputs(cfg), "started": time.time(), "attempts": (previous or {}).get("attempts", 0) + 1,
             "seconds_before": (previous or {}).get("seconds_before", 0.0) + (previous or {}).get("seconds", 0.0)}
    write_json_atomic(_state_url(cfg.run_dir, stage.name), state)
    t0 = time.monotonic()
    try:
        counts = stage.run(cfg)
    except BaseException as exc:
        state.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000], seconds=time.monotonic() - t0)
        write_json_atomic(_state_url(cfg.run_dir, stage.name), state)
        raise
    state.update(status="done", counts=counts, outputs=stage.outputs(cfg), seconds=time.monotonic() - t0,
                 finished=time.time())
    write_json_atomic(_state_url(cfg.run_dir, stage.name), state)
    log(f"[{stage.name}] done in {state['seconds']:.1f}s: {json.dumps(counts, default=str)[:300]}")
    return state
