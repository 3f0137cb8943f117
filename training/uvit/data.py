"""The shard reader: token shards -> micro-batches, deterministic and resumable.

The order of an epoch is a function of (seed, epoch) alone:
  1. every shard is cut into pieces of `PIECE_ROWS` rows (one Parquet row group each),
     and all pieces are permuted;
  2. the concatenated rows are split into `lanes` equal lanes (the tail that does not
     fill a whole step in every lane is left for the next epoch's permutation), so every
     lane, and so every rank, gets the same number of samples whatever the shard sizes;
  3. each lane is read in windows of `window_rows` rows whose order is permuted.
The filter stage already shuffles samples globally into download shards, so piece-level
permutation plus in-window shuffling mixes well while reading each row group once.

A rank owns `lanes / world_size` whole lanes and a micro-batch is the next rows of each
of them, lane after lane. The lane count is fixed for a run, so a resume on another
number of ranks reads the same samples into the same optimizer steps. The position is
the number of rows consumed per lane in the current epoch; `state_dict()` holds it.

Data-loader processes each read whole windows (window g goes to process g mod n), and
PyTorch returns their results in task order, so the batches do not depend on how many
processes read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from amused.pipeline.shards import ROW_GROUP_ROWS, TokenDataset, tensor_view
from amused.plumbing.storage import join, url_to_fs

PIECE_ROWS = ROW_GROUP_ROWS
# aMUSEd's micro-conditioning, in its order (the aesthetic score last, its default where
# missing); read besides the spec's tensor columns (image tokens, and text states or token ids).
MICRO_COLUMNS = ("orig_width", "orig_height", "crop_top", "crop_left")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


@dataclass(frozen=True)
class Piece:
    shard: str
    start: int
    stop: int


class EpochPlan:
    """Which rows each lane reads in an epoch, and in what order."""

    def __init__(self, shards: list[tuple[str, int]], lanes: int, rows_per_step: int, window_rows: int, seed: int):
        self.shards = sorted(shards)
        self.lanes = lanes
        self.rows_per_step = rows_per_step  # per lane
        self.window_rows = window_rows
        self.seed = seed
        total = sum(n for _, n in self.shards)
        self.lane_len = total // lanes
        self.steps_per_epoch = (total // lanes) // rows_per_step
        if self.steps_per_epoch < 1:
            raise ValueError(f"the token dataset has {total} rows, fewer than one global batch "
                             f"({lanes} lanes x {rows_per_step} rows)")
        self.lane_rows = self.steps_per_epoch * rows_per_step
        self.windows_per_epoch = math.ceil(self.lane_rows / window_rows)
        self._cache: tuple[int, list[Piece], np.ndarray] | None = None

    def _pieces(self, epoch: int) -> tuple[list[Piece], np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            pieces = [Piece(name, s, min(s + PIECE_ROWS, n)) for name, n in self.shards for s in range(0, n, PIECE_ROWS)]
            order = _rng(self.seed, epoch).permutation(len(pieces))
            pieces = [pieces[i] for i in order]
            ends = np.cumsum([p.stop - p.start for p in pieces])
            self._cache = (epoch, pieces, ends)
        return self._cache[1], self._cache[2]

    def rows(self, epoch: int, lane: int, start: int, stop: int) -> list[Piece]:
        """Pieces covering rows [start, stop) of a lane's stream, in stream order."""
        pieces, ends = self._pieces(epoch)
        lo, hi = lane * self.lane_len + start, lane * self.lane_len + stop
        out = []
        i = int(np.searchsorted(ends, lo, side="right"))
        while lo < hi:
            piece_start = int(ends[i - 1]) if i else 0
            p = pieces[i]
            a = p.start + (lo - piece_start)
            b = min(p.stop, p.start + (hi - piece_start))
            out.append(Piece(p.shard, a, b))
            lo += b - a
            i += 1
        return out

    def window(self, epoch: int, lane: int, w: int) -> tuple[list[Piece], np.ndarray]:
        start = w * self.window_rows
        stop = min(start + self.window_rows, self.lane_rows)
        return self.rows(epoch, lane, start, stop), _rng(self.seed, epoch, lane, w, 1).permutation(stop - start)


class _PieceReader:
    """Reads row ranges of shards; keeps a few files open per process."""

    def __init__(self, dataset_url: str, tensors: dict, default_aesthetic: float, max_open: int = 8):
        self.url = dataset_url
        self.tensors = tensors
        self.columns = [*tensors, *MICRO_COLUMNS, "aesthetic_score"]
        self.default_aesthetic = default_aesthetic
        self.max_open = max_open
        self.files: dict[str, tuple[pq.ParquetFile, np.ndarray]] = {}

    def _file(self, shard: str) -> tuple[pq.ParquetFile, np.ndarray]:
        if shard not in self.files:
            if len(self.files) >= self.max_open:
                self.files.pop(next(iter(self.files)))[0].close()
            fs, path = url_to_fs(join(self.url, shard))
            pf = pq.ParquetFile(fs.open(path, "rb"))
            starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
            self.files[shard] = (pf, starts)
        return self.files[shard]

    def read(self, pieces: list[Piece]) -> dict[str, np.ndarray]:
        parts = []
        for p in pieces:
            pf, starts = self._file(p.shard)
            first = int(np.searchsorted(starts, p.start, side="right")) - 1
            last = int(np.searchsorted(starts, p.stop - 1, side="right")) - 1
            table = pf.read_row_groups(list(range(first, last + 1)), columns=self.columns, use_threads=False)
            parts.append(table.slice(p.start - int(starts[first]), p.stop - p.start))
        out = {}
        for name in self.columns:
            cols = [t.column(name) for t in parts]
            if name in self.tensors:
                out[name] = np.concatenate([tensor_view(c, *self.tensors[name]) for c in cols])
            else:
                out[name] = np.concatenate([c.to_numpy(zero_copy_only=False) for c in cols])
        return out

    def batch(self, pieces: list[Piece], order: np.ndarray) -> dict[str, torch.Tensor]:
        cols = self.read(pieces)
        aesthetic = np.nan_to_num(cols["aesthetic_score"].astype(np.float32), nan=self.default_aesthetic)
        micro = np.stack([cols[name] for name in MICRO_COLUMNS], 1)
        # Ids (image tokens, text token ids: uint16 on disk) as int64, what embedding lookups take.
        out = {name: torch.from_numpy(cols[name][order].astype(np.int64) if cols[name].dtype.kind == "u"
                                      else cols[name][order]) for name in self.tensors}
        out["micro_conds"] = torch.from_numpy(np.concatenate([micro.astype(np.float32), aesthetic[:, None]], 1)[order])
        return out


class _Windows(IterableDataset):
    """Yields windows (all owned lanes, stacked) from a global window index on, forever."""

    def __init__(self, plan: EpochPlan, lanes: range, reader: _PieceReader, first_window: int):
        self.plan, self.lanes, self.reader, self.first = plan, lanes, reader, first_window

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        g = self.first + worker
        while True:
            epoch, w = divmod(g, self.plan.windows_per_epoch)
            per_lane = [self.reader.batch(*self.plan.window(epoch, lane, w)) for lane in self.lanes]
            yield {k: torch.stack([b[k] for b in per_lane]) for k in per_lane[0]}
            g += workers


class ShardReader:
    """Micro-batches for one rank: `next(reader)` gives a dict of tensors with
    `len(lanes) * lane_batch` rows, lane-major."""

    def __init__(self, dataset: TokenDataset, lanes: int, rank: int, world_size: int, lane_batch: int,
                 accum: int, window_rows: int, seed: int, workers: int = 0, prefetch: int = 2,
                 default_aesthetic: float = 6.0, pin_memory: bool = False):
        if lanes % world_size:
            raise ValueError(f"data.lanes={lanes} must be a multiple of the number of ranks ({world_size})")
        per_rank = lanes // world_size
        self.lanes = range(rank * per_rank, (rank + 1) * per_rank)
        self.lane_batch = lane_batch
        self.plan = EpochPlan([(s.name, s.rows) for s in dataset.shards], lanes, lane_batch * accum, window_rows, seed)
        self.reader = _PieceReader(dataset.url, dataset.spec.tensor_columns(), default_aesthetic)
        self.workers, self.prefetch, self.pin_memory = workers, prefetch, pin_memory
        self.epoch, self.position = 0, 0  # position: rows consumed per lane in this epoch
        self._it: Iterator[dict] | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "lanes": self.plan.lanes, "seed": self.plan.seed,
                "window_rows": self.plan.window_rows}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("lanes", "seed", "window_rows"):
            if state[key] != mine[key]:
                raise ValueError(f"the checkpoint's reader used {key}={state[key]}, this run {mine[key]}: "
                                 "the sample order would change")
        self.epoch, self.position = state["epoch"], state["position"]
        self._it = None

    def _start(self) -> None:
        window = self.position // self.plan.window_rows
        self._loader = DataLoader(
            _Windows(self.plan, self.lanes, self.reader, self.epoch * self.plan.windows_per_epoch + window),
            batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if self.workers else None, persistent_workers=False,
        )
        self._it = iter(self._loader)
        self._window = next(self._it)
        self._offset = self.position - window * self.plan.window_rows  # rows of the window already used

    def __iter__(self) -> "ShardReader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._it is None:
            self._start()
        need, parts = self.lane_batch, []
        while need:
            rows = self._window["image_tokens"].shape[1]
            take = min(need, rows - self._offset)
            parts.append({k: v[:, self._offset:self._offset + take] for k, v in self._window.items()})
            self._offset += take
            need -= take
            if self._offset == rows:
                self._window, self._offset = next(self._it), 0
        self.position += self.lane_batch
        if self.position == self.plan.lane_rows:
            self.epoch, self.position = self.epoch + 1, 0
        batch = {k: torch.cat([p[k] for p in parts], 1) if len(parts) > 1 else parts[0][k] for k in parts[0]}
        batch = {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}
        if self.pin_memory:
            # The loader pins whole windows; a batch is a view of one only when it neither spans two
            # windows nor takes rows of several lanes. Otherwise it is a fresh copy, pinned here too,
            # so that its copy to the GPU (non_blocking) runs while the CPU goes on queueing the step.
            batch = {k: v if v.is_pinned() else v.pin_memory() for k, v in batch.items()}
        return batch

    def close(self) -> None:
        self._it = None
        self._loader = None
