"""`amused download`'s bar (pipeline/download.py ShardProgress): fed by img2dataset's stats
files; a failed listing costs it a look, never the job."""

import io
import json

import pytest

from amused.pipeline.download import ShardProgress

pytestmark = pytest.mark.unit


def stats(folder, shard: int, count: int, successes: int) -> None:
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": count, "successes": successes}))


class FlakyListing(ShardProgress):
    """The object store fails the first `failures` listings."""

    failures = 1

    def _listing(self):
        if FlakyListing.failures:
            FlakyListing.failures -= 1
            raise OSError("503 Slow Down")
        return super()._listing()


def test_a_failed_first_listing_does_not_stop_the_job_and_finished_shards_stay_in_done(tmp_path):
    stats(tmp_path, 0, 10, 9)  # finished before: counted in `done`
    bar = FlakyListing(str(tmp_path), total=30, done=10, file=io.StringIO(), disable=False)
    assert bar.bar.n == 10
    bar.poll()  # the first look that succeeds: shard 0 is one of the finished ones, not counted again
    assert bar.bar.n == 10
    stats(tmp_path, 1, 10, 7)
    bar.poll()
    assert (bar.bar.n, bar.successes, bar.failures) == (20, 7, 3)
    bar.bar.close()


def test_a_resumed_retry_round_counts_its_finished_shards_and_reaches_its_total(tmp_path):
    stats(tmp_path, 0, 4, 4)
    stats(tmp_path, 1, 3, 1)
    bar = ShardProgress(str(tmp_path), total=10, done=None, file=io.StringIO(), disable=False)
    assert bar.bar.n == 7 and (bar.successes, bar.failures) == (0, 0)  # the rate counts this run's shards only
    stats(tmp_path, 2, 3, 2)
    bar.poll()
    bar.poll()  # a shard is counted once
    assert bar.bar.n == bar.bar.total == 10 and (bar.successes, bar.failures) == (2, 1)
    bar.bar.close()
