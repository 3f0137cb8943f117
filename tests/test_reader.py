"""The shard reader: disjoint, equal and complete per epoch; deterministic; resumable;
independent of data-loader processes and of how lanes are spread over ranks."""

import numpy as np
import pytest
import torch

from amused.demo.datasets import write_token_dataset
from amused.pipeline.shards import TokenDataset
from amused.training.uvit.data import ShardReader

SHARDS = [700, 130, 515, 3]  # uneven, and larger than one 512-row piece


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("reader") / "tokens")
    write_token_dataset(url, SHARDS)
    return TokenDataset(url)


def reader(ds, rank=0, world=1, lanes=2, lane_batch=4, accum=1, workers=0, window_rows=96):
    return ShardReader(ds, lanes=lanes, rank=rank, world_size=world, lane_batch=lane_batch, accum=accum,
                       window_rows=window_rows, seed=3, workers=workers)


def rows_of(batch) -> list[int]:
    return batch["micro_conds"][:, 3].long().tolist()


def take(r, n):
    return [next(r) for _ in range(n)]


def test_ranks_disjoint_equal_and_every_epoch_reshuffled(dataset):
    ranks = [reader(dataset, rank=r, world=2) for r in range(2)]
    steps = ranks[0].plan.steps_per_epoch
    assert steps == (sum(SHARDS) // 2) // 4
    epoch0 = [[i for b in take(r, steps) for i in rows_of(b)] for r in ranks]
    assert [len(e) for e in epoch0] == [steps * 4] * 2
    seen = epoch0[0] + epoch0[1]
    assert len(set(seen)) == len(seen) and set(seen) <= set(range(sum(SHARDS)))
    assert len(seen) >= sum(SHARDS) - 2 * 4  # only the tail short of one global batch is left out
    assert all(r.state_dict()["epoch"] == 1 and r.state_dict()["position"] == 0 for r in ranks)
    epoch1 = [i for b in take(ranks[0], steps) for i in rows_of(b)]
    assert epoch1 != epoch0[0]
    again = [i for b in take(reader(dataset, rank=0, world=2), steps) for i in rows_of(b)]
    assert again == epoch0[0]


def test_batches_carry_the_columns(dataset):
    batch = next(reader(dataset, world=1))
    assert batch["image_tokens"].dtype == torch.int64 and batch["image_tokens"].shape == (8, 8, 8)
    assert batch["text_hidden_states"].dtype == torch.float16 and batch["text_hidden_states"].shape == (8, 8, 32)
    assert batch["text_pooled"].shape == (8, 32) and batch["micro_conds"].shape == (8, 5)
    rows = np.array(rows_of(batch))
    aesthetic = batch["micro_conds"][:, 4].numpy()
    np.testing.assert_allclose(aesthetic, np.where(rows % 3 == 0, 6.0, 5.0 + (rows % 4) / 2))


def test_same_batches_with_loader_processes(dataset):
    plain = take(reader(dataset, world=1), 40)
    multi = take(reader(dataset, world=1, workers=2), 40)
    for a, b in zip(plain, multi):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_lanes_spread_over_ranks_give_the_same_global_batches(dataset):
    one = take(reader(dataset, world=1, lanes=2, lane_batch=4), 30)
    two = [take(reader(dataset, rank=r, world=2, lanes=2, lane_batch=4), 30) for r in range(2)]
    for i in range(30):
        assert rows_of(one[i]) == rows_of(two[0][i]) + rows_of(two[1][i])
    # Accumulation regroups micro-batches but keeps each optimizer step's samples.
    accum = take(reader(dataset, world=1, lanes=2, lane_batch=2, accum=2), 60)
    for i in range(30):
        a, b = rows_of(accum[2 * i]), rows_of(accum[2 * i + 1])
        assert a[:2] + b[:2] + a[2:] + b[2:] == rows_of(one[i])


@pytest.mark.parametrize("stop", [1, 23, 81, 170])
def test_resume_mid_stream_gives_the_next_items(dataset, stop):
    straight = take(reader(dataset, world=1), stop + 5)
    first = reader(dataset, world=1, workers=1)
    take(first, stop)
    state = first.state_dict()
    resumed = reader(dataset, world=1)
    resumed.load_state_dict(state)
    for a, b in zip(straight[stop:], take(resumed, 5)):
        assert rows_of(a) == rows_of(b)
    other = reader(dataset, world=1, window_rows=64)
    with pytest.raises(ValueError, match="window_rows"):
        other.load_state_dict(state)


def test_an_ids_dataset_gives_the_token_ids_as_int64(tmp_path, tiny_models):
    url = str(tmp_path / "ids")
    write_token_dataset(url, [40], text_seq_len=77, text_encoder=str(tiny_models))
    ds = TokenDataset(url)
    batch = next(reader(ds, world=1))
    assert set(batch) == {"image_tokens", "text_ids", "micro_conds"}
    assert batch["text_ids"].dtype == torch.int64 and batch["text_ids"].shape == (8, 77)
    stored = next(ds.iter_batches(batch_size=100))["text_ids"]
    np.testing.assert_array_equal(batch["text_ids"].numpy(), stored[rows_of(batch)])
