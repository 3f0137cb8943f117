"""A strict reader of img2dataset-style webdataset tars (`KEY.jpg|png|gif|...`, `KEY.txt`, `KEY.json`).

Members are returned as raw bytes and never decoded here: whatever its extension,
nothing is unpickled, `torch.load`ed or piped through a command. A tar whose members
of one key are not adjacent, or that repeats a member, is malformed and raises
`ShardFormatError` naming the tar and the key.

Python's tarfile takes a damaged header, or a file cut at a member boundary, for the
normal end of the archive and drops the rest without a word. This reader refuses both:
a tar must end in its end-of-archive zero block with nothing but zeros after it, and
every header's checksum must hold.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator

from amused.plumbing.fsio import file_exists_in
from amused.plumbing.storage import url_to_fs

# Extensions of the formats pipeline.images decodes (its IMAGE_FORMATS), in order of preference.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "avif", "gif", "bmp", "tif", "tiff")
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


class TarDamage(tarfile.ReadError):
    pass


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's header reader, but a damaged header or a missing end-of-archive marker
    raises TarDamage instead of ending the archive early."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        offset = tar.offset
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # a zero block: the end-of-archive marker
            _expect_only_zeros(tar.fileobj, offset + tarfile.BLOCKSIZE)
            raise
        except tarfile.EmptyHeaderError:
            raise TarDamage(f"no end-of-archive marker: the file ends at byte {offset}, right after a member "
                            "(cut short?)") from None
        except tarfile.TruncatedHeaderError:
            raise TarDamage(f"the file ends inside the member header at byte {offset} (cut short?)") from None
        except tarfile.InvalidHeaderError as exc:
            raise TarDamage(f"damaged member header at byte {offset} ({exc}); the members after it are lost") \
                from None


def _expect_only_zeros(fileobj, offset: int) -> None:
    """What follows the end-of-archive marker must be zero padding: a zeroed block in the
    middle of a tar, or a second archive appended, would otherwise hide members."""
    while block := fileobj.read(1 << 16):
        if block.count(0) != len(block):
            at = offset + len(block) - len(block.lstrip(b"\0"))
            raise TarDamage(f"data after the end-of-archive marker at byte {at} (a zeroed block in the middle, "
                            "or archives concatenated); the members after it would be lost")
        offset += len(block)


def iter_samples(fileobj: IO[bytes], source: str, expected: int | None = None) -> Iterator[RawSample]:
    """Samples in tar order; raises ShardFormatError on a malformed, damaged or unreadable
    tar, and when `expected` (img2dataset's recorded count) differs from what it holds."""
    seen: set[str] = set()
    current: RawSample | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_StrictTarInfo) as tar:
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
    if expected is not None and expected != len(seen):
        raise ShardFormatError(f"{source}: holds {len(seen)} samples, but img2dataset's stats file records "
                               f"{expected} successes; samples are missing or extra")


def shard_samples(url: str) -> Iterator[RawSample]:
    """The samples of the tar at `url` (any fsspec URL), read strictly and checked against
    img2dataset's recorded count when its stats file lies beside the tar."""
    fs, path = url_to_fs(url)
    expected = recorded_sample_count(fs, path)
    with fs.open(path, "rb") as fh:
        yield from iter_samples(fh, url, expected)


def recorded_sample_count(fs, tar_path: str) -> int | None:
    """img2dataset's `successes` from the `NNNNN_stats.json` beside a tar (fsspec `fs`),
    or None when there is no such file or count."""
    stats = f"{tar_path.removesuffix('.tar')}_stats.json"
    # A HEAD, not exists(): on object stores that adds a LIST for every missing file.
    if not tar_path.endswith(".tar") or not file_exists_in(fs, stats):
        return None
    data = fs.cat_file(stats)
    try:
        stats_obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardFormatError(f"{stats}: unreadable img2dataset stats file ({exc})") from None
    successes = stats_obj.get("successes") if isinstance(stats_obj, dict) else None
    return successes if isinstance(successes, int) and not isinstance(successes, bool) else None


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
    """The sample's json (img2dataset's per-sample record); {} when absent.

    A json member that is not a JSON object raises BadSample("bad_metadata").
    """
    raw = sample.members.get("json")
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadSample("bad_metadata", f"json member is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_metadata", f"json member holds a {type(meta).__name__}, not an object")
    return meta


# Largest plausible recorded side, for the filter and here alike: 16x JPEG's own limit
# (65,535) still passes, so only numbers that no decodable image has (overflow, ids or
# byte counts in the column) go; it also fits the token dataset's int32 columns.
MAX_RECORDED_SIDE = 1 << 20
_FLOAT32_MAX = 3.4028234663852886e38


def aesthetic_of(meta: dict) -> float | None:
    """The first aesthetic score recorded under AESTHETIC_KEYS; None when none is.

    NaN counts as not recorded: img2dataset copies metadata columns through pandas, which
    writes a missing float as NaN. Any other value that is not a finite number within
    float32 raises BadSample("bad_metadata").
    """
    for name in AESTHETIC_KEYS:
        value = meta.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= _FLOAT32_MAX:
            raise BadSample("bad_metadata", f"{name}: {value!r} is not a finite number")
        return float(value)
    return None


def original_size_of(meta: dict) -> tuple[int, int] | None:
    """The size before img2dataset resized the image, when it recorded one (both sides).

    A recorded side that is not a whole number in 1..MAX_RECORDED_SIDE raises BadSample("bad_metadata").
    """
    sides = []
    for name in ("original_width", "original_height"):
        value = meta.get(name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or not 0 < value <= MAX_RECORDED_SIDE):
            raise BadSample("bad_metadata", f"{name}: {value!r} is not a pixel count in 1..{MAX_RECORDED_SIDE}")
        sides.append(value)
    return None if None in sides else (sides[0], sides[1])


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
    with tarfile.open(fileobj=src, mode="r:", tarinfo=_StrictTarInfo) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: split_member_name(m.name))
        write_tar(dst, ((m.name, m.size, tar.extractfile(m)) for m in members))
    return len(members)
