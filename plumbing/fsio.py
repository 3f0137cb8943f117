"""Atomic writes on any fsspec filesystem.

A file is written under a temporary name beside its target and moved into place only
when complete, so a reader never sees a partial file under its final name. On local
disks the move is an atomic rename; on object stores a finished PUT is itself atomic.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from contextlib import contextmanager
from typing import Iterator

import pyarrow.parquet as pq

from amused.plumbing.storage import url_to_fs

TMP_MARK = ".tmp-"


class HashingWriter:
    """File-like wrapper that hashes and counts the bytes written through it."""

    def __init__(self, fh):
        self._fh = fh
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._fh.write(data)

    def flush(self) -> None:
        self._fh.flush()

    def tell(self) -> int:
        return self.size

    @property
    def closed(self) -> bool:
        return self._fh.closed

    def writable(self) -> bool:
        return True


@contextmanager
def atomic_writer(url: str) -> Iterator[HashingWriter]:
    fs, path = url_to_fs(url)
    parent, _, name = path.rpartition("/")
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/{name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as fh:
            writer = HashingWriter(fh)
            yield writer
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def write_json_atomic(url: str, obj) -> None:
    with atomic_writer(url) as fh:
        fh.write(json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(url: str):
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return json.loads(fh.read())


def sha256_of(url: str) -> str:
    fs, path = url_to_fs(url)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_files(url: str, suffix: str, required: bool = True) -> list[str]:
    """URLs in name order of a single file, a folder's `*{suffix}` files, or a glob."""
    fs, path = url_to_fs(url)
    if any(c in path for c in "*?["):
        found = fs.glob(path)
    elif fs.isfile(path):
        found = [path]
    else:
        found = fs.glob(f"{path.rstrip('/')}/*{suffix}")
    found = sorted(p for p in found if TMP_MARK not in p.rsplit("/", 1)[-1])
    if not found and required:
        raise FileNotFoundError(f"no *{suffix} files at {url}")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if protocol == "file" else f"{protocol}://{p}" for p in found]


def parquet_columns(url: str) -> list[str]:
    """Column names of a Parquet file, from its footer only."""
    fs, path = url_to_fs(url)
    return pq.read_schema(path, filesystem=fs).names


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)
