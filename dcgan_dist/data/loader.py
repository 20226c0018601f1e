"""Streaming loader: WebDataset shards -> uint8 image batches, split by rank and by DataLoader worker.

Splitting. The sorted shard list is dealt out to ranks (`shards[rank::world_size]`), then each rank's shards
to its DataLoader workers. Every (rank, worker) slot reads a disjoint set of shards, and together they cover
the data set. A slot's stream is infinite: it walks its shards in *passes*; each pass visits every one of its
samples once, in an order drawn from (seed, rank, worker, pass): shard order shuffled, then a shuffle buffer.
No rank ever runs out and waits for another; an epoch (num_samples / global batch steps) is a bookkeeping
unit for logs only.

Resuming. Each batch carries its slot's position (pass, raw samples consumed in that pass). The checkpoint
keeps the last position per slot; on resume a slot re-enters its pass and skips that many raw samples
without decoding them, which reproduces the exact batch sequence of an uninterrupted run.

Faults. An unreadable shard (missing, truncated, not a tar) or an undecodable image is logged, counted and
skipped; neither stops training. Counts travel with the batches to the training process.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import decode_sample, expand_shards, iter_samples

log = logging.getLogger("dcgan_dist.data")

# Fields of the per-batch info tensor that travels next to the images.
_ROLE, _PASS, _OFFSET, _BAD_SAMPLES, _BAD_SHARDS = range(5)


def slot_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (seed, rank, worker, pass), stable across processes and runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32).view(np.uint64)[0] >> 1)


def split_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    if len(urls) < world_size:
        raise ValueError(
            f"{len(urls)} shard(s) cannot feed {world_size} workers without overlap; "
            f"write at least {world_size} shards (smaller --shard-size) or use fewer workers"
        )
    return urls[rank::world_size]


class ShardStream(IterableDataset):
    """Infinite stream of (uint8 images B x C x H x W, info) batches for one rank."""

    def __init__(
        self,
        urls: list[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_slots: int = 1,
        shuffle_buffer: int = 1000,
        expect_chw: tuple[int, int, int] | None = None,
        positions: dict[int, tuple[int, int]] | None = None,
        slot_offset: int = 0,
    ):
        self.rank_urls = split_for_rank(urls, rank, world_size)
        self.num_slots = num_slots
        self.batch_size, self.rank, self.seed = batch_size, rank, seed
        self.shuffle_buffer, self.expect_chw = shuffle_buffer, expect_chw
        self.positions = dict(positions or {})
        self.slot_offset = slot_offset

    def _check_shape(self, array: np.ndarray, sample: dict) -> None:
        if self.expect_chw is None:
            return
        c, h, w = self.expect_chw
        if array.shape != (h, w, c):
            raise ValueError(
                f"shard {sample.get('__url__')} holds {array.shape[0]}x{array.shape[1]} images with "
                f"{array.shape[2]} channel(s), but the model expects {h}x{w} with {c}; "
                "set model.image_size/model.channels to match, or convert the data with --size"
            )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # Rotating roles on resume keeps the DataLoader's round-robin order identical to the interrupted run.
        slot = (worker + self.slot_offset) % self.num_slots
        urls = self.rank_urls[slot :: self.num_slots]
        pass_index, skip = self.positions.get(slot, (0, 0))
        counts = {"bad_samples": 0, "bad_shards": 0}
        warned: set[str] = set()

        def on_shard_error(exc: Exception) -> bool:
            counts["bad_shards"] += 1
            key = str(exc)[:200]
            if key not in warned:
                warned.add(key)
                log.warning("skipping unreadable shard data (rank %d, slot %d): %s", self.rank, slot, key)
            return True  # keep going with the next shard

        batch: list[np.ndarray] = []
        while True:
            rng = random.Random(slot_seed(self.seed, self.rank, slot, pass_index))
            order = list(urls)
            rng.shuffle(order)
            samples = wds.filters._shuffle(
                iter_samples(order, handler=on_shard_error), bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng
            )
            consumed = 0
            for consumed, sample in enumerate(samples, 1):
                if consumed <= skip:
                    continue  # resuming: already trained on; skipped without decoding
                try:
                    array = decode_sample(sample)
                except ValueError as exc:
                    counts["bad_samples"] += 1
                    log.warning("skipping sample: %s", exc)
                    continue
                self._check_shape(array, sample)
                batch.append(array)
                if len(batch) == self.batch_size:
                    images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()
                    meta = torch.tensor([slot, pass_index, consumed, counts["bad_samples"], counts["bad_shards"]])
                    counts = {"bad_samples": 0, "bad_shards": 0}
                    batch = []
                    yield images, meta
            if consumed == 0:
                raise RuntimeError(f"no readable samples in the shards of rank {self.rank}, slot {slot}: {order[:3]}...")
            pass_index, skip = pass_index + 1, 0


@dataclass
class LoaderCounters:
    batches: int = 0
    bad_samples: int = 0
    bad_shards: int = 0


class ImageBatches:
    """Iterator of uint8 image batches for one rank, with a resumable position.

    `state_dict()` after consuming k batches, passed back as `state`, continues with batch k + 1 of the same
    sequence (same seed, shards, batch size, world size and worker count).
    """

    def __init__(
        self,
        shards: str | list[str],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        expect_chw: tuple[int, int, int] | None = None,
        state: dict | None = None,
        pin_memory: bool = False,
    ):
        urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
        rank_urls = split_for_rank(urls, rank, world_size)
        # A slot needs at least one shard of its own, so a rank never runs more loader workers than shards.
        num_slots = max(1, min(num_workers, len(rank_urls))) if num_workers > 0 else 1
        if num_workers > num_slots:
            log.warning("rank %d has %d shard(s): using %d loader worker(s) instead of %d", rank, len(rank_urls), num_slots, num_workers)
        self.layout = {"world_size": world_size, "rank": rank, "slots": num_slots, "batch_size": batch_size, "seed": seed}
        self.counters = LoaderCounters()
        self.positions: dict[int, tuple[int, int]] = {}
        if state:
            if state.get("layout") == self.layout:
                self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["positions"].items()}
                self.counters.batches = int(state["batches"])
            else:
                log.warning("data layout changed since the checkpoint (%s -> %s): the data stream restarts", state.get("layout"), self.layout)
        stream = ShardStream(
            urls, batch_size, rank, world_size, seed, num_slots, shuffle_buffer, expect_chw,
            positions=self.positions, slot_offset=self.counters.batches % num_slots,
        )
        self._loader = DataLoader(
            stream,
            batch_size=None,  # the stream batches itself
            num_workers=num_slots if num_workers > 0 else 0,
            pin_memory=pin_memory,
            prefetch_factor=4 if num_workers > 0 else None,
            persistent_workers=False,
            worker_init_fn=_loader_worker_init if num_workers > 0 else None,
        )
        self._it: Iterator | None = None
        self.num_slots = num_slots

    def __iter__(self) -> "ImageBatches":
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = iter(self._loader)
        images, meta = next(self._it)
        slot, pass_index, offset, bad_samples, bad_shards = (int(v) for v in meta.tolist())
        self.positions[slot] = (pass_index, offset)
        self.counters.batches += 1
        self.counters.bad_samples += bad_samples
        self.counters.bad_shards += bad_shards
        return images

    def state_dict(self) -> dict:
        return {
            "layout": dict(self.layout),
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "batches": self.counters.batches,
        }

    def close(self) -> None:
        # Dropping the iterator shuts the loader's worker processes down.
        self._it = None


def _loader_worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL work; keep torch from spawning thread pools per worker


def normalise(images: torch.Tensor, device: torch.device | str, channels_last: bool = False) -> torch.Tensor:
    """uint8 [0, 255] batch -> float in [-1, 1] on `device` (the generator's Tanh range).

    The uint8 batch crosses to the device (4x less traffic than float), the conversion runs there.
    """
    out = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out
