"""Images from webdataset shards: random crops for VQ-GAN training (ImageCropReader),
centre crops of held-out images for evaluation (held_out_batches).

Each epoch permutes the shards by (seed, epoch); rank r reads every world-th shard of
that order, front to back, and streams on into the next epoch when its shards run out,
so every rank always has a next batch. A sample's crop is drawn from (seed, epoch,
shard, sample index): the same every time, whatever came before. The position (epoch,
place in the rank's shard list, samples read in the current shard) is the whole state:
a reader rebuilt from `state_dict()` yields exactly the batches that would have come
next. Undecodable or too-small images are skipped and counted by reason.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from amused.pipeline.images import open_image
from amused.pipeline.wds import BadSample, RawSample, shard_samples
from amused.plumbing.fsio import list_files
from amused.tokenizer.image import fit_image


class ImageCropReader:
    def __init__(self, images: str, resolution: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, max_pixels: int = 1 << 28):
        self.shards = list_files(images, ".tar")
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} image shards cannot feed {world_size} ranks: each needs one")
        self.resolution, self.batch_size, self.seed, self.max_pixels = resolution, batch_size, seed, max_pixels
        self.rank, self.world_size = rank, world_size
        self.epoch, self.shard_pos, self.read = 0, 0, 0
        self.yielded_in_epoch = 0  # an epoch that yields nothing means no usable image at all
        self.skipped: Counter = Counter()
        self._samples: Iterator[tuple[int, RawSample]] | None = None

    def my_shards(self, epoch: int) -> list[int]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(i) for i in order[self.rank::self.world_size]]

    def _open(self) -> Iterator[tuple[int, RawSample]]:
        shard = self.my_shards(self.epoch)[self.shard_pos]
        for i, sample in enumerate(shard_samples(self.shards[shard])):
            if i >= self.read:
                yield shard, sample

    def _crop(self, shard: int, index: int, data: bytes) -> np.ndarray:
        img, _ = open_image(data, min_side=self.resolution, max_pixels=self.max_pixels)
        # Random scale between "shorter side = resolution" and 1.25x, then a random crop.
        rng = np.random.default_rng([self.seed, self.epoch, shard, index])
        scale = self.resolution * rng.uniform(1.0, 1.25) / min(img.size)
        w, h = max(self.resolution, round(img.width * scale)), max(self.resolution, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = int(rng.integers(0, w - self.resolution + 1)), int(rng.integers(0, h - self.resolution + 1))
        return np.asarray(img.crop((left, top, left + self.resolution, top + self.resolution)))

    def _next_image(self) -> np.ndarray:
        while True:
            if self._samples is None:
                self._samples = self._open()
            found = next(self._samples, None)
            if found is None:  # this shard is done: the next one, or the next epoch
                self._samples, self.read = None, 0
                self.shard_pos += 1
                if self.shard_pos == len(self.my_shards(self.epoch)):
                    if self.yielded_in_epoch == 0:
                        raise ValueError(f"rank {self.rank}'s shards hold no usable image "
                                         f"(skipped: {dict(self.skipped)})")
                    self.epoch, self.shard_pos, self.yielded_in_epoch = self.epoch + 1, 0, 0
                continue
            shard, sample = found
            index = self.read
            self.read += 1
            image = sample.image
            if image is None:
                self.skipped["no_image"] += 1
                continue
            try:
                crop = self._crop(shard, index, image[1])
            except BadSample as exc:
                self.skipped[exc.reason] += 1
                continue
            self.yielded_in_epoch += 1
            return crop

    def __iter__(self) -> "ImageCropReader":
        return self

    def __next__(self) -> torch.Tensor:
        """(batch, 3, resolution, resolution) float32 pixels in [0, 1]."""
        batch = np.stack([self._next_image() for _ in range(self.batch_size)])
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "read": self.read,
                "yielded_in_epoch": self.yielded_in_epoch, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.shard_pos, self.read = state["epoch"], state["shard_pos"], state["read"]
        self.yielded_in_epoch = state["yielded_in_epoch"]
        self.skipped = Counter(state["skipped"])
        self._samples = None


def held_out_batches(images: str, resolution: int, batch_size: int, max_images: int = 0, skipped: Counter | None = None,
                     min_side: int = 16, max_pixels: int = 1 << 28) -> Iterator[np.ndarray]:
    """uint8 (n, resolution, resolution, 3) batches, in shard order: each image's shorter side
    resized to `resolution` (bicubic) and centre-cropped. Undecodable images are counted
    by reason in `skipped`, not fatal."""
    skipped = Counter() if skipped is None else skipped
    batch, count = [], 0
    for shard in list_files(images, ".tar"):
        for sample in shard_samples(shard):
            if max_images and count >= max_images:
                break
            found = sample.image
            if found is None:
                skipped["no_image"] += 1
                continue
            try:
                img, _ = open_image(found[1], min_side=min_side, max_pixels=max_pixels, target=resolution)
            except BadSample as exc:
                skipped[exc.reason] += 1
                continue
            batch.append(fit_image(img, resolution, Image.Resampling.BICUBIC))
            count += 1
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
    if batch:
        yield np.stack(batch)
