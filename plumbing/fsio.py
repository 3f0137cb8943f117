"""Atomic writes on any fsspec filesystem.

A reader never sees a partial file under its final name. On S3 an object appears only
when its single PUT, or its multipart upload, completes, so the file is written under its
final name and, on failure, discarded before anything is sent (an open multipart upload
is aborted): one request per small file, and no server-side copy of a large one. On
other filesystems it is written under a temporary name beside its target and moved into
place when complete (an atomic rename on local disks).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from amused.plumbing.storage import protocol, url_to_fs

TMP_MARK = ".tmp-"
# S3: an upload is invisible until complete and its fsspec file can discard one; an
# object's existence is one HEAD request.
_S3 = frozenset({"s3", "s3a"})


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
    if protocol(fs) in _S3:
        fh = fs.open(path, "wb")
        try:
            yield HashingWriter(fh)
        except BaseException:
            fh.discard()
            fh.closed = True  # closing a discarded file would upload it
            raise
        fh.close()
        return
    parent, _, name = path.rpartition("/")
    fs.makedirs(parent, exist_ok=True)
    # A leading dot: what a crash leaves behind is a hidden file, which pyarrow, pandas, Ray and
    # Hugging Face datasets skip when they read the folder as a dataset.
    tmp = f"{parent}/.{name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        with fs.open(tmp, "wb") as fh:
            writer = HashingWriter(fh)
            yield writer
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def upload_tree(local: Path, url: str, last: frozenset[str] = frozenset()) -> None:
    """Every file under the local folder `local` to the same names under `url`, the names
    in `last` (completion markers) after all others, so a reader that sees a marker sees
    the files it vouches for."""
    fs, root = url_to_fs(url)
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for name in sorted(names, key=lambda n: n in last):
        fs.put_file(str(local / name), f"{root.rstrip('/')}/{name}")


def write_json_atomic(url: str, obj) -> None:
    with atomic_writer(url) as fh:
        fh.write(json.dumps(obj, indent=1, sort_keys=True).encode())


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        return fh.read()


def read_json(url: str):
    return json.loads(read_bytes(url))


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
    else:
        # The folder's listing first: on object stores asking whether a folder is a file
        # costs a HEAD and a LIST of its own.
        found = fs.glob(f"{path.rstrip('/')}/*{suffix}")
        if not found and fs.isfile(path):
            found = [path]
    found = sorted(p for p in found if TMP_MARK not in p.rsplit("/", 1)[-1])
    if not found and required:
        raise FileNotFoundError(f"no *{suffix} files at {url}")
    scheme = protocol(fs)
    return [p if scheme == "file" else f"{scheme}://{p}" for p in found]


def parquet_columns(url: str) -> list[str]:
    """Column names of a Parquet file, from its footer only."""
    fs, path = url_to_fs(url)
    return pq.read_schema(path, filesystem=fs).names


def exists(url: str) -> bool:
    """Whether a file or a folder is at `url`."""
    fs, path = url_to_fs(url)
    return fs.exists(path)


def file_exists(url: str) -> bool:
    """Whether a file is at `url`: for markers. On S3 one HEAD request, where exists() also
    asks, when no object has that name, whether a folder has (a LIST request per missing file)."""
    return file_exists_in(*url_to_fs(url))


def file_exists_in(fs, path: str) -> bool:
    """`file_exists` for a path on a filesystem the caller already holds."""
    if protocol(fs) not in _S3:
        return fs.isfile(path)
    bucket, key, _ = fs.split_path(path)
    try:
        fs.call_s3("head_object", Bucket=bucket, Key=key)
        return True
    except FileNotFoundError:
        return False
