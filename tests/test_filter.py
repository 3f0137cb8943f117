"""`amused filter`: exact kept sets and per-rule counts on nasty rows, independent of
workers and file splits, resumable, S3 in and out."""

import dataclasses
import math
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs

from amused.pipeline.filter import (
    REPORT,
    SCRATCH,
    WORK,
    FilterConfig,
    _check_or_start_job,
    _job_fingerprint,
    _partitions,
    dedup_partition,
    filter_file,
    filter_metadata,
    resolve_mapping,
)
from amused.pipeline.urls import normalize, sample_keys
from amused.plumbing.fsio import list_files, read_json, sha256_of
from amused.plumbing.storage import join

GOOD = dict(WIDTH=512.0, HEIGHT=384.0, similarity=0.33, punsafe=0.01, pwatermark=0.1, AESTHETIC_SCORE=5.5)
NAN = float("nan")

# (url, caption, overrides, rule expected to reject it or None for kept)
FILE_A = [
    ("https://example.com/a.jpg", "a cat", {}, "duplicate_url"),
    (None, "no url", {}, "url_scheme"),
    ("ftp://example.com/x.jpg", "ftp", {}, "url_scheme"),
    ("file:///etc/passwd", "file", {}, "url_scheme"),
    ("data:image/png;base64,iVBORw0KGgo=", "inline", {}, "url_scheme"),
    ("ftp://example.com/y.jpg", "", {}, "url_scheme"),  # fails two rules: counted under the first
    ("http://10.0.0.5/x.jpg", "private", {}, "url_address"),
    ("http://169.254.169.254/latest/meta-data/", "metadata", {}, "url_address"),
    ("http://192.168.1.1/a.jpg", "router", {}, "url_address"),
    ("http://[fe80::1]/a.jpg", "link local v6", {}, "url_address"),
    ("http://user@172.16.0.1/a.jpg", "userinfo hides a private host", {}, "url_address"),
    ("http://167772161/a.jpg", "10.0.0.1 as one decimal number", {}, "url_address"),
    ("http://0xa9.0xfe.0xa9.0xfe/", "metadata address in hex", {}, "url_address"),
    ("http://localhost/a.jpg", "localhost", {}, "url_address"),
    ("http://127.0.0.1:8000/ok.jpg", "allowed loopback", {}, None),
    ("https://example.com/empty.jpg", "", {}, "caption_chars"),
    ("https://example.com/null.jpg", None, {}, "caption_chars"),
    ("https://example.com/space.jpg", "   \t ", {}, "caption_chars"),
    ("https://example.com/long.jpg", "word " * 1000, {}, "caption_chars"),
    ("https://example.com/cat-zh.jpg", "一只猫坐在窗台上", {}, None),
    ("https://example.com/cat-ar.jpg", "قطة تجلس على النافذة", {}, None),
    ("https://example.com/nan-w.jpg", "nan width", {"WIDTH": NAN}, "invalid_size"),
    ("https://example.com/null-w.jpg", "null width", {"WIDTH": None}, "image_size"),
    ("https://example.com/neg-w.jpg", "negative width", {"WIDTH": -100.0}, "invalid_size"),
    ("https://example.com/small-h.jpg", "small height", {"HEIGHT": 10.0}, "image_size"),
    ("https://example.com/wide.jpg", "panorama", {"WIDTH": 4000.0, "HEIGHT": 400.0}, "aspect_ratio"),
    ("https://example.com/sim.jpg", "low similarity", {"similarity": 0.1}, "similarity"),
    ("https://example.com/sim-nan.jpg", "nan similarity", {"similarity": NAN}, "similarity"),
    ("https://example.com/nsfw.jpg", "nsfw", {"punsafe": 0.9}, "nsfw"),
    ("https://example.com/wm.jpg", "watermark", {"pwatermark": 0.8}, "watermark"),
    ("https://example.com/ugly.jpg", "low aesthetic", {"AESTHETIC_SCORE": 3.0}, "aesthetic"),
    ("https://example.com/no-aes.jpg", "null aesthetic", {"AESTHETIC_SCORE": None}, "aesthetic"),
    ("HTTPS://Example.com/a.jpg", "a cat, upper-case scheme", {}, None),  # smallest URL of its key: kept
    ("https://example.com/a.jpg#frag", "a cat, fragment", {}, "duplicate_url"),
]
FILE_B = [("https://example.com/a.jpg", "a cat again", {}, "duplicate_url")] + \
    [(f"https://example.org/img/{i}.jpg", f"picture number {i}", {}, None) for i in range(12)]

RULES = dict(min_width=64, min_height=64, max_aspect_ratio=3.0, min_similarity=0.28, max_nsfw=0.5,
             max_watermark=0.5, min_aesthetic=4.5, max_caption_chars=200, allow_hosts="127.0.0.1")


def laion_table(rows) -> pa.Table:
    cols = {"URL": [r[0] for r in rows], "TEXT": [r[1] for r in rows]}
    for name, value in GOOD.items():
        cols[name] = [r[2].get(name, value) for r in rows]
    cols["WIDTH"] = [None if v is None else v for v in cols["WIDTH"]]
    return pa.table(cols, schema=pa.schema([("URL", pa.string()), ("TEXT", pa.string())]
                                           + [(k, pa.float64()) for k in GOOD]))


def write_files(folder, tables) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, t in enumerate(tables):
        pq.write_table(t, os.path.join(folder, f"part-{i:03d}.parquet"), row_group_size=7)
    return str(folder)


def output_rows(url: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(u) for u in list_files(url, ".parquet")])


def output_bytes(url: str) -> dict[str, str]:
    """sha256 of each download shard, by name."""
    return {u.rsplit("/", 1)[-1]: sha256_of(u) for u in list_files(url, ".parquet")}


def expected_counts(rows) -> dict:
    out = {}
    for *_, rule in rows:
        if rule:
            out[rule] = out.get(rule, 0) + 1
    return out


@pytest.fixture(scope="module")
def nasty_input(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("meta"), [laion_table(FILE_A), laion_table(FILE_B)])


@pytest.fixture(scope="module")
def reference(nasty_input, tmp_path_factory, ray_session):
    out = str(tmp_path_factory.mktemp("filtered") / "ref")
    report = filter_metadata(FilterConfig(input=nasty_input, output=out, rows_per_shard=4, progress=False,
                                          workers=1, **RULES))
    return out, report


def test_kept_set_and_rule_counts_are_exact(reference):
    out, report = reference
    rows = output_rows(out)
    kept = [r for r in FILE_A + FILE_B if r[3] is None]
    expected_keys, _ = sample_keys(normalize(pa.array([r[0] for r in kept])))
    assert sorted(rows.column("sample_key").to_pylist()) == sorted(expected_keys.to_pylist())
    assert len(set(rows.column("sample_key").to_pylist())) == rows.num_rows
    assert "HTTPS://Example.com/a.jpg" in rows.column("url").to_pylist()

    expected_total = expected_counts(FILE_A + FILE_B)
    assert {k: v for k, v in report.total["rejected"].items() if v} == expected_total
    assert report.total["rows_in"] == len(FILE_A) + len(FILE_B)
    assert report.total["rows_out"] == rows.num_rows == len(kept)
    file_a, file_b = report.files
    assert {k: v for k, v in file_a["rejected"].items() if v} == expected_counts(FILE_A)
    assert {k: v for k, v in file_b["rejected"].items() if v} == expected_counts(FILE_B)
    # shards are fixed-size slices of one seeded order; the report and the shards agree
    sizes = [pq.read_metadata(u).num_rows for u in list_files(out, ".parquet")]
    assert sizes == [4] * (len(kept) // 4) + ([len(kept) % 4] if len(kept) % 4 else [])
    assert report.shards == len(sizes) == math.ceil(len(kept) / 4)
    assert read_json(join(out, REPORT))["total"] == report.total
    assert not os.path.exists(join(out, WORK))


def test_output_bytes_are_independent_of_workers_splits_and_partitions(reference, nasty_input, tmp_path, ray_session):
    out, _ = reference
    two_workers = filter_metadata(FilterConfig(input=nasty_input, output=str(tmp_path / "w2"), rows_per_shard=4,
                                               progress=False, workers=2, **RULES))
    assert two_workers.total == read_json(join(out, REPORT))["total"]
    assert output_bytes(str(tmp_path / "w2")) == output_bytes(out)

    rows = FILE_A + FILE_B
    resplit = write_files(tmp_path / "resplit", [laion_table(rows[i::3]) for i in range(3)])
    again = filter_metadata(FilterConfig(input=resplit, output=str(tmp_path / "s3"), rows_per_shard=4,
                                         partition_rows=3, progress=False, **RULES))
    assert again.total == read_json(join(out, REPORT))["total"]
    # the same bytes, though shards now span partitions (of 3 rows) and the files are split otherwise
    assert output_bytes(str(tmp_path / "s3")) == output_bytes(out)


def test_rerun_after_a_crash_redoes_only_missing_files(reference, nasty_input, tmp_path, ray_session):
    out, _ = reference
    src = write_files(tmp_path / "in", [laion_table(FILE_A), laion_table(FILE_B)])
    crashed = str(tmp_path / "crashed")
    cfg = FilterConfig(input=src, output=crashed, rows_per_shard=4, progress=False, **RULES)
    # the state a crash leaves: file 0 finished, file 1 half-written under a temporary name
    files = list_files(src, ".parquet")
    _, mapping = resolve_mapping("auto", {}, pq.read_schema(files[0]).names)
    _check_or_start_job(cfg, _job_fingerprint(cfg, files, mapping))
    filter_file({"index": 0, "path": files[0]}, crashed, mapping, cfg.rules(), cfg.seed)
    with open(join(crashed, WORK, "files", f".00001{SCRATCH}.tmp-dead0000"), "wb") as fh:
        fh.write(b"PAR1 half a file")
    # Were file 0 filtered again, these rows would show in the output.
    pq.write_table(laion_table([(f"https://other.net/{i}.jpg", "other", {}, None) for i in range(5)]), files[0])

    report = filter_metadata(cfg)
    assert report.total == read_json(join(out, REPORT))["total"]
    assert output_rows(crashed).equals(output_rows(out))
    assert filter_metadata(cfg).total == report.total  # a finished job is not redone
    # other rules on the same output are refused rather than mixed
    with pytest.raises(ValueError, match="other settings"):
        filter_metadata(FilterConfig(input=src, output=crashed, rows_per_shard=4, progress=False))


def test_a_rerun_keeps_the_partitions_of_the_first_run(reference, nasty_input, tmp_path, ray_session):
    out, _ = reference
    stopped = str(tmp_path / "stopped")
    cfg = FilterConfig(input=nasty_input, output=stopped, rows_per_shard=4, progress=False, **RULES)
    files = list_files(nasty_input, ".parquet")
    _, mapping = resolve_mapping("auto", {}, pq.read_schema(files[0]).names)
    _check_or_start_job(cfg, _job_fingerprint(cfg, files, mapping))
    for i, path in enumerate(files):
        filter_file({"index": i, "path": path}, stopped, mapping, cfg.rules(), cfg.seed)
    # The first run planned 2 partitions and finished the first (half the rank space) ...
    assert _partitions(stopped, 2) == 2
    dedup_partition({"partition": 0}, stopped, list(range(len(files))), 2, True)
    # ... the rerun, with other partition sizes (or on more CPUs), must not read it as its partition 0 of many,
    # whether it finds the pin or the pin is gone (each partition's result names its plan).
    lost = str(tmp_path / "lost")
    shutil.copytree(stopped, lost)
    os.remove(join(lost, WORK, "partitions.json"))
    for folder in (stopped, lost):
        again = filter_metadata(dataclasses.replace(cfg, output=folder, partition_rows=3))
        assert again.total == read_json(join(out, REPORT))["total"]
        assert output_bytes(folder) == output_bytes(out)


def test_missing_column_names_file_and_column(tmp_path, ray_session):
    bad = write_files(tmp_path / "bad", [laion_table(FILE_B).drop_columns(["pwatermark"])])
    with pytest.raises(ValueError, match=r"part-000\.parquet: missing column 'pwatermark'"):
        filter_metadata(FilterConfig(input=bad, output=str(tmp_path / "o"), progress=False, **RULES))
    # without the watermark rule the column is not needed
    report = filter_metadata(FilterConfig(input=bad, output=str(tmp_path / "o"), progress=False,
                                          **{**RULES, "max_watermark": None}))
    assert report.total["rows_in"] == len(FILE_B)
    with pytest.raises(ValueError, match="CANONICAL=SOURCE"):
        FilterConfig(input=bad, output="x", columns="pixels=WIDTH")


def test_malformed_numbers_in_string_columns_are_rejected_not_fatal(tmp_path, ray_session):
    t = pa.table({"url": [f"https://a.org/{i}.jpg" for i in range(4)], "caption": ["c"] * 4,
                  "w": ["512", "abc", " 1e3 ", None]})
    src = write_files(tmp_path / "in", [t])
    report = filter_metadata(FilterConfig(input=src, output=str(tmp_path / "out"), schema="cc12m",
                                          columns="width=w,height=w", min_width=100, min_height=100,
                                          progress=False))
    assert report.total["rejected"]["image_size"] == 1  # None: unknown, and the rule needs a size
    assert report.total["rejected"]["invalid_size"] == 1  # "abc"
    assert sorted(output_rows(str(tmp_path / "out")).column("width").to_pylist()) == [512, 1000]


# A recorded side that no image has is bad metadata, dropped and counted even without a
# size rule; null (and a blank string) is unknown and kept.
BAD_SIDES = [0, -5, NAN, math.inf, -math.inf, 12.5, float(2**20 + 1), 1e300]
GOOD_SIDES = [1, 640, 2**20, None]


def sized_table(widths, kind) -> pa.Table:
    return pa.table({"url": [f"https://a.org/{kind}/{i}.jpg" for i in range(len(widths))],
                     "caption": ["c"] * len(widths), "w": pa.array(widths, type=kind), "h": [300] * len(widths)})


def test_invalid_recorded_sizes_are_dropped_with_a_reason_without_size_rules(tmp_path, ray_session):
    tables = [sized_table(BAD_SIDES + GOOD_SIDES, pa.float64()),
              sized_table([0, -1, 2**40, 7, None], pa.int64()),
              sized_table(["12.5", "0", "abc", "nan", "1e7", " 640 ", "", "  ", None], pa.string()),
              sized_table([True, False, None], pa.bool_())]
    src = write_files(tmp_path / "in", tables)
    columns = dict(schema="cc12m", columns="width=w,height=h", progress=False)
    report = filter_metadata(FilterConfig(input=src, output=str(tmp_path / "out"), **columns))
    bad = [len(BAD_SIDES), 3, 5, 2]
    assert [f["rejected"]["invalid_size"] for f in report.files] == bad
    assert report.total["rows_out"] == sum(t.num_rows for t in tables) - sum(bad)
    widths = output_rows(str(tmp_path / "out")).column("width").to_pylist()
    assert sorted(widths, key=lambda w: (w is None, w)) == [1, 7, 640, 640, 2**20] + [None] * 6

    kept = filter_metadata(FilterConfig(input=src, output=str(tmp_path / "kept"), drop_invalid_sizes=False,
                                        **columns))
    assert kept.total["rows_out"] == sum(t.num_rows for t in tables)
    assert "invalid_size" not in kept.total["rejected"]
    assert output_rows(str(tmp_path / "kept")).column("width").null_count == 6 + sum(bad)


def test_s3_in_and_out_equals_local(reference, nasty_input, s3_bucket, ray_session):
    out, _ = reference
    fs = s3fs.S3FileSystem()
    fs.put(nasty_input + "/", f"{s3_bucket}/meta/", recursive=True)
    report = filter_metadata(FilterConfig(input=f"{s3_bucket}/meta", output=f"{s3_bucket}/filtered",
                                          rows_per_shard=4, progress=False, **RULES))
    assert report.total == read_json(join(out, REPORT))["total"]
    remote = pa.concat_tables([pq.read_table(u.removeprefix("s3://"), filesystem=fs)
                               for u in list_files(f"{s3_bucket}/filtered", ".parquet")])
    assert remote.equals(output_rows(out))
    assert not fs.exists(f"{s3_bucket}/filtered/{WORK}")


def test_seed_changes_the_order_not_the_set(reference, nasty_input, tmp_path, ray_session):
    out, _ = reference
    other = filter_metadata(FilterConfig(input=nasty_input, output=str(tmp_path / "seed1"), rows_per_shard=4,
                                         seed=1, progress=False, **RULES))
    a, b = output_rows(out), output_rows(str(tmp_path / "seed1"))
    assert sorted(a.column("sample_key").to_pylist()) == sorted(b.column("sample_key").to_pylist())
    assert a.column("sample_key").to_pylist() != b.column("sample_key").to_pylist()
    assert other.total == read_json(join(out, REPORT))["total"]


def test_sample_keys_are_pinned_and_ignore_scheme_case_and_fragment():
    # A change here (say, in pandas' SipHash) would re-key every dataset made before it.
    keys, _ = sample_keys(normalize(pa.array(["http://example.com/a", "HTTP://EXAMPLE.com/a#top",
                                              " http://example.com/a "])))
    assert keys.to_pylist() == ["8d5f9d30607280c05187acc2a3fb64d3"] * 3
