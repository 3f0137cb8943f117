"""Random-crop image stream for VQ-GAN training: deterministic, rank-disjoint, resumable."""

import pytest
import torch

from amused.demo.datasets import sample_members, write_shape_shards
from amused.pipeline.wds import ShardFormatError, tar_bytes
from amused.training.vqgan.data import ImageCropReader, held_out_batches


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqimages")
    write_shape_shards(str(root), shards=3, per_shard=5, min_size=40, max_size=90)
    bad = sample_members("bad0", b"not an image", "x", None) + sample_members("small", None, "no image", None)
    (root / "00003.tar").write_bytes(tar_bytes(bad + sample_members("bad1", b"\xff\xd8\xff", "y", None)))
    return str(root)


def take(reader, n):
    return [next(reader) for _ in range(n)]


def test_stream_is_deterministic_and_crops_are_random(shards):
    a = take(ImageCropReader(shards, 32, 4, seed=1), 6)
    b = take(ImageCropReader(shards, 32, 4, seed=1), 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (4, 3, 32, 32) and a[0].dtype == torch.float32 and 0 <= a[0].min() and a[0].max() <= 1
    other = take(ImageCropReader(shards, 32, 4, seed=2), 1)
    assert not torch.equal(other[0], a[0])
    # 15 usable images per epoch: batch 4 (epoch 1) comes from the next epoch, with other crops
    flat = torch.cat(a)
    assert not any(torch.equal(flat[i], flat[j]) for i in range(15) for j in range(15, 24))


def test_resume_mid_stream_and_across_an_epoch_gives_the_same_batches(shards):
    whole = take(ImageCropReader(shards, 32, 4, seed=3), 8)
    for cut in (1, 3, 5):
        first = ImageCropReader(shards, 32, 4, seed=3)
        take(first, cut)
        state = first.state_dict()
        resumed = ImageCropReader(shards, 32, 4, seed=3)
        resumed.load_state_dict(state)
        assert all(torch.equal(x, y) for x, y in zip(take(resumed, 8 - cut), whole[cut:]))


def test_ranks_read_disjoint_shards_and_bad_samples_are_counted(shards):
    readers = [ImageCropReader(shards, 32, 1, rank=r, world_size=2, seed=0) for r in range(2)]
    mine = [set(r.my_shards(0)) for r in readers]
    assert not mine[0] & mine[1] and mine[0] | mine[1] == {0, 1, 2, 3}
    reader = ImageCropReader(shards, 32, 1, seed=0)
    take(reader, 16)  # the 15 usable images of epoch 0, then the first of epoch 1
    per_epoch = {"not_an_image": 2, "no_image": 1}
    twice = reader.my_shards(1)[0] == 3  # epoch 1 may start with the bad shard
    assert dict(reader.skipped) == {k: v * (2 if twice else 1) for k, v in per_epoch.items()}
    with pytest.raises(ValueError, match="cannot feed 5 ranks"):
        ImageCropReader(shards, 32, 1, rank=0, world_size=5)


def test_shards_without_a_usable_image_stop_with_a_clear_error(tmp_path):
    (tmp_path / "00000.tar").write_bytes(tar_bytes(sample_members("bad", b"nope", "x", None)))
    with pytest.raises(ValueError, match="no usable image"):
        next(ImageCropReader(str(tmp_path), 32, 2))


def test_a_shard_missing_samples_its_stats_file_records_is_refused(tmp_path):
    """VQ-GAN training and held-out images read tars as strictly as pre-tokenization."""
    write_shape_shards(str(tmp_path), shards=1, per_shard=3, min_size=40, max_size=90)
    (tmp_path / "00000_stats.json").write_text('{"successes": 4}')
    with pytest.raises(ShardFormatError, match="holds 3 samples, but img2dataset's stats file records 4"):
        take(ImageCropReader(str(tmp_path), 32, 4, seed=1), 1)
    with pytest.raises(ShardFormatError, match="holds 3 samples"):
        list(held_out_batches(str(tmp_path), 32, 4))
