"""fsspec URLs: the retry policy of every S3 client, model folders (resolve sub-folders,
cache remote ones, fingerprint).

Object storage throttles (503 SlowDown), fails (500) and drops connections. botocore
retries each request with jittered exponential backoff (a random wait in [0, min(2^k, 20)]
seconds before retry k) up to `AWS_MAX_ATTEMPTS` attempts in all; s3fs repeats a call that
still failed with a throttle or a dropped connection up to 5 times, and re-reads a body cut
off in the middle. botocore reads the policy from the environment whenever it makes a
client, so it is set here, at import: every process that touches storage imports this
module (url_to_fs lives here), and every process started after it inherits it: Ray's
raylet and workers started by ray.init, img2dataset's processes, DeepSpeed ranks; workers
of a cluster that `ray start` began get it through the job's runtime_env
(`plumbing.raysession`). A value
already set in the environment wins, so a cluster can choose its own (AWS_RETRY_MODE=adaptive
adds client-side rate limiting).

s3fs keeps every listing it made for the life of the process and answers later listings
and exists() from it, so a driver that listed a folder before its workers wrote there
would not see their files; the listing cache is off for S3 (a listing is one request per
1,000 names, made where it is needed).

`from_pretrained` in diffusers and transformers reads only local folders, so a remote
folder (s3://...) is copied once into a local cache under a temporary name and renamed
into place, which makes concurrent fetches from several actors on one node safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec

CACHE_ENV = "AMUSED_CACHE"
# Fast node-local disk where work on a remote folder (a run folder on S3) is written before
# it is uploaded and read after it is downloaded; a cluster points it at its NVMe.
SCRATCH_ENV = "AMUSED_SCRATCH"
RETRY_POLICY = {"AWS_RETRY_MODE": "standard", "AWS_MAX_ATTEMPTS": "8"}
for _name, _value in RETRY_POLICY.items():
    os.environ.setdefault(_name, _value)
# fsspec reads FSSPEC_<PROTOCOL> (JSON) when a process imports it: the same setting for
# processes that never import this module (img2dataset's workers).
os.environ.setdefault("FSSPEC_S3", json.dumps({"use_listings_cache": False}))
fsspec.config.conf.setdefault("s3", {}).setdefault("use_listings_cache", False)


def storage_env() -> dict[str, str]:
    """The storage settings of this process's environment, for processes that do not
    inherit it: Ray workers on other nodes were started by `ray start`, not by us."""
    return {name: os.environ[name] for name in (*RETRY_POLICY, "FSSPEC_S3", CACHE_ENV, SCRATCH_ENV)
            if name in os.environ}


def url_to_fs(url: str):
    """(filesystem, path) for a local path, file:// or any fsspec URL."""
    return fsspec.core.url_to_fs(url)


def is_local(url: str) -> bool:
    fs, _ = url_to_fs(url)
    return "file" in _protocols(fs)


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def _protocols(fs) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def protocol(fs) -> str:
    """The main name of a filesystem's protocol ("file", "s3", ...)."""
    return _protocols(fs)[0]


def scratch_folder(url: str) -> Path:
    """This node's local working copy of the remote folder `url`: one per folder and node,
    shared by the ranks on it (each writes and reads its own files there)."""
    root = Path(os.environ.get(SCRATCH_ENV) or Path(tempfile.gettempdir()) / "amused-scratch")
    return root / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:20]


def _cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "amused")) / "models"


def _remote_listing(fs, root: str) -> dict[str, int]:
    files = fs.find(root, detail=True)
    return {os.path.relpath(p, root): int(info.get("size") or 0) for p, info in files.items()}


def local_folder(url: str) -> Path:
    """A local path holding the folder at `url`; remote folders are fetched into the cache.

    A cached copy is reused while the remote listing (names and sizes) is unchanged.
    """
    fs, root = url_to_fs(url)
    if "file" in _protocols(fs):
        path = Path(root)
        if not path.is_dir():
            raise FileNotFoundError(f"model folder not found: {url}")
        return path
    listing = _remote_listing(fs, root)
    if not listing:
        raise FileNotFoundError(f"model folder not found or empty: {url}")
    dest = _cache_root() / hashlib.sha256(url.encode()).hexdigest()[:20]
    marker = dest / ".amused-listing.json"
    if marker.exists() and json.loads(marker.read_text()) == listing:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        for rel in listing:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root.rstrip('/')}/{rel}", str(target))
        (tmp / marker.name).write_text(json.dumps(listing, sort_keys=True))
        # Every rank of a node may fetch the same folder at once: a copy another one finished
        # meanwhile may already be loading there, so only a stale copy is removed.
        if marker.exists() and json.loads(marker.read_text()) == listing:
            return dest
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another process on this node finished the same fetch first; use its copy.
            if not (marker.exists() and json.loads(marker.read_text()) == listing):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# Where a VQ-GAN sits inside a diffusers pipeline folder (`vqvae/`) or ours (`vqgan/`).
VQGAN_SUBFOLDERS = ("vqvae", "vqgan")


def resolve_subfolder(url: str, names: tuple[str, ...]) -> str:
    """`url/<name>` for the first name present, else `url` itself.

    Lets one flag accept either a component folder or a whole diffusers pipeline folder
    (where the VQ-GAN lives under `vqvae/` and CLIP under `text_encoder/` + `tokenizer/`).
    """
    fs, root = url_to_fs(url)
    for name in names:
        if fs.isdir(f"{root.rstrip('/')}/{name}"):
            return join(url, name)
    return url


def folder_fingerprint(path: str | Path) -> str:
    """SHA-256 over the relative names and contents of every file in a local folder."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".amused-")):
        digest.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()
