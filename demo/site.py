"""The demo's stand-in for the internet: shape images served over HTTP from a folder
(local or any fsspec URL: a run whose data lives on S3 keeps its site there too) with
LAION-schema metadata pointing at them, and LAION-like metadata at scale for the filter
benchmark."""

from __future__ import annotations

import functools
import mimetypes
import posixpath
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from amused.demo.shapes import encode_image, shape_image
from amused.plumbing.fsio import atomic_writer
from amused.plumbing.storage import join, url_to_fs


def write_shape_site(www: str, metadata: str, images: int, base_url: str, min_size: int = 48, max_size: int = 96,
                     seed: int = 0, per_part: int = 500) -> dict:
    """Shape images as files under `www` and LAION-schema metadata Parquet under
    `metadata` whose URLs point at `base_url`. Written in parts of `per_part` images; a
    part counts once its Parquet file exists (written last, atomically), so a rerun
    writes only the missing parts and the same bytes."""
    fs, root = url_to_fs(metadata)
    fs.makedirs(root, exist_ok=True)
    site, site_root = url_to_fs(www)
    parts = (images + per_part - 1) // per_part
    written = 0
    for part in range(parts):
        url = join(metadata, f"part-{part:05d}.parquet")
        if fs.exists(url_to_fs(url)[1]):
            continue
        folder = f"{site_root.rstrip('/')}/{part:05d}"
        site.makedirs(folder, exist_ok=True)
        rows: dict[str, list] = {k: [] for k in ("SAMPLE_ID", "URL", "TEXT", "WIDTH", "HEIGHT", "similarity",
                                                 "punsafe", "pwatermark", "AESTHETIC_SCORE")}
        for i in range(part * per_part, min(images, (part + 1) * per_part)):
            rng = np.random.default_rng([seed, i])
            w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            img, caption = shape_image(rng, w, h)
            site.pipe_file(f"{folder}/{i}.jpg", encode_image(img))
            for key, value in (("SAMPLE_ID", i), ("URL", f"{base_url}/{part:05d}/{i}.jpg"), ("TEXT", caption),
                               ("WIDTH", float(w)), ("HEIGHT", float(h)), ("similarity", 0.35), ("punsafe", 0.01),
                               ("pwatermark", 0.05), ("AESTHETIC_SCORE", round(float(rng.uniform(5, 7)), 3))):
                rows[key].append(value)
        with atomic_writer(url) as fh:
            pq.write_table(pa.table(rows), fh, compression="zstd")
        written += 1
    return {"images": images, "parts": parts, "parts_written": written}


class _FolderHandler(BaseHTTPRequestHandler):
    """GET/HEAD of the files under one folder of a filesystem; anything else is a 404."""

    def __init__(self, *args, fs, root: str, **kwargs):
        self.fs, self.root = fs, root.rstrip("/")
        super().__init__(*args, **kwargs)

    def _body(self) -> bytes | None:
        rel = posixpath.normpath(unquote(urlsplit(self.path).path)).lstrip("/")
        if rel in ("", ".") or rel.startswith(".."):
            return None
        try:
            return self.fs.cat_file(f"{self.root}/{rel}")
        except (FileNotFoundError, IsADirectoryError):
            return None

    def do_HEAD(self, send_body: bool = False) -> None:
        body = self._body()
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(self.path)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self.do_HEAD(send_body=True)

    def log_message(self, *args):
        pass


class ImageServer:
    """Serves a folder (local or any fsspec URL) on 127.0.0.1:`port` from a thread (the demo's internet)."""

    def __init__(self, folder: str, port: int):
        fs, root = url_to_fs(folder)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(_FolderHandler, fs=fs, root=root))
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


_WORDS = ("a photo of a red blue green small large old new cat dog house tree car city beach mountain river "
          "painting portrait sunset night street food flower bird boat road sky garden winter summer").split()


def laion_metadata(rows: int, seed: int = 0, start: int = 0, duplicate_rate: float = 0.02) -> pa.Table:
    """LAION-2B-en-schema metadata with realistic column types, built without a per-row loop.

    About `duplicate_rate` of the URLs repeat earlier ones; a few rows have bad sizes,
    non-http schemes or empty captions, so every rule has something to do.
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(start, start + rows)
    dup = rng.random(rows) < duplicate_rate
    ids[dup] = rng.integers(0, start + rows, dup.sum())
    hosts = pa.array(np.char.add("https://img", (ids % 997).astype(str)))
    url = pc.binary_join_element_wise(hosts, ".example.com/photos/", pa.array(ids.astype(str)), ".jpg", "")
    scheme_bad = rng.random(rows) < 0.005
    url = pc.if_else(pa.array(scheme_bad), pc.replace_substring(url, "https://", "ftp://"), url)
    pool = [" ".join(rng.choice(_WORDS, rng.integers(3, 14))) for _ in range(4096)]
    pool[0] = ""
    text = pa.array(pool).take(pa.array(rng.integers(0, len(pool), rows)))
    width = rng.integers(64, 2048, rows).astype(np.float64)
    width[rng.random(rows) < 0.002] = np.nan
    return pa.table({
        "SAMPLE_ID": pa.array(ids, pa.int64()), "URL": url, "TEXT": text,
        "HEIGHT": pa.array(rng.integers(64, 2048, rows).astype(np.float64)), "WIDTH": pa.array(width),
        "LICENSE": pa.array(np.full(rows, "?", dtype=object)), "NSFW": pa.array(np.full(rows, "UNLIKELY", dtype=object)),
        "similarity": pa.array(rng.uniform(0.2, 0.45, rows)), "punsafe": pa.array(rng.beta(1, 20, rows)),
        "pwatermark": pa.array(rng.beta(1, 6, rows)), "AESTHETIC_SCORE": pa.array(rng.normal(5.0, 0.8, rows)),
    })


def write_laion_metadata(out: str, files: int, rows_per_file: int, seed: int = 0) -> list[str]:
    """`files` Parquet files named part-NNNNN.parquet of `laion_metadata` rows."""
    fs, root = url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    urls = []
    for i in range(files):
        url = join(out, f"part-{i:05d}.parquet")
        with fs.open(url_to_fs(url)[1], "wb") as fh:
            pq.write_table(laion_metadata(rows_per_file, seed + i, start=i * rows_per_file), fh,
                           compression="snappy")
        urls.append(url)
    return urls
