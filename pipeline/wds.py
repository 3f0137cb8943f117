"""A strict reader of img2dataset-style webdataset tars (`KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`).

Members are returned as raw bytes and never decoded here: whatever its extension,
nothing is unpickled, `torch.load`ed or piped through a command. A tar whose members
of one key are not adjacent, or that repeats a member, is malformed and raises
`ShardFormatError` naming the tar and the key.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
AESTHETIC_KEYS = ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic")


class ShardFormatError(ValueError):
    pass


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes] = field(default_factory=dict)

    @property
    def image(self) -> tuple[str, bytes] | None:
        for ext in IMAGE_EXTS:
            if ext in self.members:
                return ext, self.members[ext]
        return None


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything before the first dot of the base name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot:
        return "", ""
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_samples(fileobj: IO[bytes], source: str) -> Iterator[RawSample]:
    """Samples in tar order; raises ShardFormatError on a malformed or unreadable tar."""
    seen: set[str] = set()
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_member_name(member.name)
                if not key or key.startswith("__"):  # no extension, or webdataset's __index__-style metadata
                    continue
                if current is None or key != current.key:
                    if key in seen:
                        raise ShardFormatError(
                            f"{source}: members of key {key!r} are not adjacent (at member {member.name!r}); "
                            "webdataset requires all files of a sample to be consecutive"
                        )
                    if current is not None:
                        yield current
                    seen.add(key)
                    current = RawSample(key)
                if ext in current.members:
                    raise ShardFormatError(f"{source}: member {member.name!r} appears twice")
                current.members[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardFormatError(f"{source}: unreadable tar ({type(exc).__name__}: {exc})") from exc
    if current is not None:
        yield current


class BadSample(Exception):
    """A sample that is skipped, with a short machine-readable reason and a detail."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def caption_of(sample: RawSample) -> str:
    raw = sample.members.get("txt")
    if raw is None:
        raise BadSample("missing_caption")
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise BadSample("caption_not_utf8", str(exc)) from None
    if not text:
        raise BadSample("empty_caption")
    return text


def metadata_of(sample: RawSample) -> dict:
    """The sample's json (img2dataset's per-sample record); {} when absent or unreadable."""
    raw = sample.members.get("json")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def aesthetic_of(meta: dict) -> float | None:
    for name in AESTHETIC_KEYS:
        value = meta.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def original_size_of(meta: dict) -> tuple[int, int] | None:
    """The size before img2dataset resized the image, when it recorded one."""
    w, h = meta.get("original_width"), meta.get("original_height")
    if isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0:
        return w, h
    return None


def write_tar(fileobj: IO[bytes], members: Iterable[tuple[str, int, IO[bytes]]]) -> None:
    """(name, size, data) members in the given order, with fixed metadata (mtime 0, mode
    644): the same samples in the same order give the same bytes."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, size, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o644
            tar.addfile(info, data)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    write_tar(buf, ((name, len(data), io.BytesIO(data)) for name, data in members))
    return buf.getvalue()


def sort_shard(src: IO[bytes], dst: IO[bytes]) -> int:
    """Copies a webdataset tar with its samples in key order (each sample's files by
    extension), streaming member by member; returns the number of members."""
    with tarfile.open(fileobj=src, mode="r:") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: split_member_name(m.name))
        write_tar(dst, ((m.name, m.size, tar.extractfile(m)) for m in members))
    return len(members)
