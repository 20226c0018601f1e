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

Resizing (elastic training). Positions depend on the layout (world size, loader workers, batch size); a
*ledger* does not: for every shard, the latest pass it was trained in and which of its samples (by ordinal in
the shard) were trained in that pass. Each batch carries its samples' (pass, shard, ordinal), the training
process marks them, and the ledger is checkpointed with every rank's position. A checkpoint resumed with
another layout re-deals the shards to the new ranks and slots; each slot first finishes its shards' passes,
leaving out what the ledger says was trained, so no sample of a pass is lost or read twice across a resize.

Faults. An unreadable shard (missing, truncated, not a tar) or an undecodable image is logged, counted and
skipped; neither stops training. A shard that ends early without an error (truncated at a member boundary)
is caught by comparing each pass's samples per shard with the counts dataset.json records: a warning once per
shard, and the shortfall counted. Counts travel with the batches to the training process.
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..images import to_unit_range
from .shards import decode_sample, expand_shards, iter_samples, read_info, shard_counts, spec_parts
from .synth import ensure_synthetic

log = logging.getLogger("dcgan_dist.data")

# Fields of the per-batch info tensor that travels next to the images.
_COUNTERS = ("bad_samples", "bad_shards", "missing_samples")


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


@dataclass
class ShardStream(IterableDataset):
    """Infinite stream of (uint8 images B x C x H x W in channels-last memory, info) batches from one rank's
    shards, dealt out to its `num_slots` loader workers. positions: {slot: (pass, raw samples consumed)} to resume
    from."""

    rank_urls: list[str]
    batch_size: int
    rank: int
    seed: int
    num_slots: int
    shuffle_buffer: int
    expect_chw: tuple[int, int, int] | None
    shard_counts: dict[str, int] = field(default_factory=dict)  # shard path -> samples written (dataset.json)
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    slot_offset: int = 0
    shard_ids: dict[str, int] = field(default_factory=dict)  # shard path -> index in the whole sorted shard list
    # After a resize: shard path -> (pass, trained[ordinal]) from the checkpoint's ledger, left out of that pass.
    trained_before: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)

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
        slot = (worker + self.slot_offset) % self.num_slots
        urls = self.rank_urls[slot :: self.num_slots]
        pass_index, skip = self.positions.get(slot, (0, 0))
        counts = dict.fromkeys(_COUNTERS, 0)
        warned: set[str] = set()

        def on_shard_error(exc: Exception) -> bool:
            counts["bad_shards"] += 1
            key = str(exc)[:200]
            if key not in warned:
                warned.add(key)
                log.warning("skipping unreadable shard data (rank %d, slot %d): %s", self.rank, slot, key)
            return True  # keep going with the next shard

        last_resized_pass = max((p for p, _ in self.trained_before.values()), default=-1)
        batch: list[np.ndarray] = []
        batch_ids: list[tuple[int, int, int]] = []  # (pass, shard id, ordinal) of each image in `batch`
        while True:
            rng = random.Random(slot_seed(self.seed, self.rank, slot, pass_index))
            order = list(urls)
            rng.shuffle(order)
            # A shard the ledger has in a later pass already had this one in full.
            order = [u for u in order if self.trained_before.get(u, (pass_index,))[0] <= pass_index]
            shuffle = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
            per_shard = dict.fromkeys(order, 0)
            samples = shuffle(self._untrained(iter_samples(order, handler=on_shard_error), pass_index, per_shard))
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
                batch_ids.append((pass_index, self.shard_ids.get(sample["__url__"], -1), sample["__index__"]))
                if len(batch) == self.batch_size:
                    # One copy on this side: the batch stays in the shards' channels-last layout, and the device
                    # that trains on it rearranges it (normalise), where that is cheap.
                    images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
                    meta = torch.tensor([slot, pass_index, consumed, *(counts[k] for k in _COUNTERS)])
                    counts = dict.fromkeys(_COUNTERS, 0)
                    yield images, meta, torch.tensor(batch_ids)
                    batch, batch_ids = [], []
            if consumed == 0 and pass_index > last_resized_pass:
                raise RuntimeError(f"no readable samples in the shards of rank {self.rank}, slot {slot}: {order[:3]}...")
            for url, got in per_shard.items():  # a shard that ended early (truncated at a member boundary)
                want = self.shard_counts.get(url, got)
                if got < want:
                    counts["missing_samples"] += want - got
                    if url not in warned:
                        warned.add(url)
                        log.warning("shard %s gave %d of its %d samples (dataset.json); check it with "
                                    "`python -m dcgan_dist.data inspect`", url, got, want)
            pass_index, skip = pass_index + 1, 0


    def _untrained(self, samples: Iterator[dict], pass_index: int, per_shard: dict[str, int]) -> Iterator[dict]:
        """Count what each shard gives, and leave out what the ledger of a resized run says was trained in this
        pass already (by each sample's ordinal in its shard, `__index__`)."""
        url, trained = None, None
        for sample in samples:
            if sample["__url__"] != url:
                url = sample["__url__"]
                before = self.trained_before.get(url)
                trained = before[1] if before is not None and before[0] == pass_index else None
            per_shard[url] = per_shard.get(url, 0) + 1
            index = sample["__index__"]
            if trained is not None and index < len(trained) and trained[index]:
                continue
            yield sample


@dataclass
class LoaderCounters:
    batches: int = 0
    bad_samples: int = 0  # undecodable images, skipped
    bad_shards: int = 0  # read errors (missing, truncated mid-member, not a tar), per pass
    missing_samples: int = 0  # samples that shards did not give although dataset.json counts them, per pass


class ImageBatches:
    """Iterator of uint8 image batches (B x C x H x W, channels-last memory: `normalise` rearranges them on the
    device) for one rank, with a resumable position.

    `state_dict()` after consuming k batches, given to `load_state_dict` of a new ImageBatches before its first
    batch, continues with batch k + 1 of the same sequence (same seed, shards, batch size, world size and
    worker count). `load_rank_states` takes every rank's saved state: with the same layout it is the exact
    resume above, with another one (a resized run) the shards are re-dealt and each pass continues without
    the samples the ledger says were trained. The loader processes start at the first batch.
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
        pin_memory: bool = False,
    ):
        urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
        counts, missing = shard_counts(shards) if isinstance(shards, str) else ({}, [])
        if missing:
            log.warning("dataset.json lists %d shard(s) that are gone (%d samples): %s", len(missing),
                        sum(counts[m] for m in missing), ", ".join(os.path.basename(m) for m in missing[:5]))
        rank_urls = split_for_rank(urls, rank, world_size)
        # A slot needs at least one shard of its own, so a rank never runs more loader workers than shards.
        self.num_slots = max(1, min(num_workers, len(rank_urls))) if num_workers > 0 else 1
        if num_workers > self.num_slots:
            log.warning("rank %d has %d shard(s): using %d loader worker(s) instead of %d",
                        rank, len(rank_urls), self.num_slots, num_workers)
        self.num_workers, self.pin_memory, self.rank = num_workers, pin_memory, rank
        self.urls, self.rank_urls = urls, rank_urls
        self.stream = ShardStream(rank_urls, batch_size, rank, seed, self.num_slots, shuffle_buffer, expect_chw,
                                  shard_counts=counts, shard_ids={u: i for i, u in enumerate(urls)})
        self.layout = {"world_size": world_size, "rank": rank, "slots": self.num_slots, "batch_size": batch_size, "seed": seed}
        self.counters = LoaderCounters()
        self.positions: dict[int, tuple[int, int]] = {}
        self.ledger: dict[int, tuple[int, np.ndarray]] = {}  # shard id -> (pass, trained[ordinal]) of this rank
        self._it: Iterator | None = None

    def _start(self) -> Iterator:
        # Rotating the slots' roles on resume keeps the DataLoader's round-robin order that of the interrupted run.
        self.stream.positions, self.stream.slot_offset = dict(self.positions), self.counters.batches % self.num_slots
        workers = self.num_slots if self.num_workers > 0 else 0
        return iter(DataLoader(
            self.stream,
            batch_size=None,  # the stream batches itself
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
            worker_init_fn=_loader_worker_init if workers else None,
        ))

    def __iter__(self) -> "ImageBatches":
        return self

    def __next__(self) -> torch.Tensor:
        if self._it is None:
            self._it = self._start()
        images, meta, ids = next(self._it)
        slot, pass_index, offset, *counts = (int(v) for v in meta.tolist())
        self.positions[slot] = (pass_index, offset)
        self.counters.batches += 1
        for name, value in zip(_COUNTERS, counts):
            setattr(self.counters, name, getattr(self.counters, name) + value)
        self._mark_trained(ids.numpy())
        return images

    def _mark_trained(self, ids: np.ndarray) -> None:
        """Enter a batch's (pass, shard id, ordinal) rows in the ledger."""
        for shard in np.unique(ids[:, 1]):
            rows = ids[ids[:, 1] == shard]
            for pass_index in np.unique(rows[:, 0]):  # a batch that spans the end of a pass holds two
                ordinals = rows[rows[:, 0] == pass_index, 2]
                entry = self.ledger.get(int(shard))
                if entry is None or entry[0] < pass_index:  # the shard's first sample of a new pass
                    entry = (int(pass_index), np.zeros(0, dtype=bool))
                trained = entry[1]
                if ordinals.max() >= len(trained):
                    trained = np.concatenate([trained, np.zeros(int(ordinals.max()) + 1 - len(trained), dtype=bool)])
                trained[ordinals] = True
                self.ledger[int(shard)] = (entry[0], trained)

    def state_dict(self) -> dict:
        return {
            "layout": dict(self.layout),
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "batches": self.counters.batches,
            "ledger": _ledger_to_state({self.urls[i]: entry for i, entry in self.ledger.items()}),
            # What this layout's streams started without (a resized run); an exact resume needs it again.
            "trained_before": _ledger_to_state(self.stream.trained_before),
        }

    def load_state_dict(self, state: dict) -> None:
        """This rank's own saved state (same layout: the exact continuation)."""
        self.load_rank_states({self.rank: state})

    def load_rank_states(self, states: dict[int, dict]) -> None:
        """Every rank's saved state, from a checkpoint of this layout or of another one (a resized run)."""
        if self._it is not None:
            raise RuntimeError("load_state_dict must come before the first batch")
        mine = states.get(self.rank)
        ids = {u: i for i, u in enumerate(self.urls)}
        if mine is not None and mine.get("layout") == self.layout:
            self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in mine["positions"].items()}
            self.counters.batches = int(mine["batches"])
            self.ledger = {ids[u]: e for u, e in _ledger_from_state(mine.get("ledger", {})).items() if u in ids}
            self.stream.trained_before = _ledger_from_state(mine.get("trained_before", {}))
            return
        ledgers = [state.get("ledger") for state in states.values()]
        old = next(iter(states.values()), {}).get("layout")
        if not ledgers or any(ledger is None for ledger in ledgers):
            log.warning("data layout changed since the checkpoint (%s -> %s) and it has no ledger: the data stream "
                        "restarts", old, self.layout)
            return
        merged: dict[str, tuple[int, np.ndarray]] = {}  # the ranks' ledgers hold disjoint shards
        for ledger in ledgers:
            merged.update(_ledger_from_state(ledger))
        mine_now = set(self.rank_urls)
        self.ledger = {ids[u]: e for u, e in merged.items() if u in mine_now}
        self.stream.trained_before = {u: e for u, e in merged.items() if u in mine_now}
        if self.rank == 0:
            log.warning("data layout changed since the checkpoint (%d worker(s) x batch %s -> %d x %d): shards "
                        "re-dealt; each pass goes on without the samples it already trained", len(states),
                        old.get("batch_size") if old else "?", self.layout["world_size"], self.layout["batch_size"])

    def close(self) -> None:
        # Dropping the iterator shuts the loader's worker processes down, unless an error raised through it (e.g.
        # an object store that stopped answering) still holds it in its traceback: then it is told to, since its
        # workers ignore SIGTERM and the process would wait for them forever at exit.
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()


def _ledger_to_state(ledger: dict[str, tuple[int, np.ndarray]]) -> dict[str, list]:
    """{shard path: [pass, number of ordinals, trained bits packed]} (compact: a bit per sample)."""
    return {url: [int(p), len(trained), np.packbits(trained).tobytes()] for url, (p, trained) in ledger.items()}


def _ledger_from_state(state: dict[str, list]) -> dict[str, tuple[int, np.ndarray]]:
    return {url: (int(p), np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n).astype(bool))
            for url, (p, n, bits) in state.items()}


def _loader_worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is PIL work; keep torch from spawning thread pools per worker
    # Ctrl-C reaches the whole process group: the training process stops gracefully and shuts its loader
    # processes down itself (and they exit when it dies), so they must not die first with a traceback.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def normalise(images: torch.Tensor, device: torch.device | str, channels_last: bool = False) -> torch.Tensor:
    """uint8 batch -> float in [-1, 1] on `device`: the uint8 batch crosses to the device (4x less traffic than
    float; from pinned memory without waiting, when the loader pins) and is rearranged and converted there.
    The loader's batches are B x C x H x W views of channels-last memory; the result is contiguous, or
    channels-last memory when `channels_last`."""
    images = images.to(device, non_blocking=True)
    images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return to_unit_range(images)


def check_shards(spec: str, expect_chw: tuple[int, int, int], world_size: int = 1, probe: bool = True) -> None:
    """Before training: the shards exist, there are enough for every worker, and each part of the spec holds
    images of the model's size and channels, as its dataset.json says or else (probe) its first sample does.
    Raises FileNotFoundError or ValueError with a one-line message."""
    split_for_rank(expand_shards(spec), 0, world_size)
    for part, info in spec_parts(spec):
        if info is not None:
            shape, source = (info.image_size, info.image_size, info.channels), f"{part} dataset.json"
        elif probe:
            first = expand_shards(part)[0]
            shape, source = _first_image(first).shape, first
        else:
            continue
        c, h, w = expect_chw
        if tuple(shape) != (h, w, c):
            raise ValueError(f"the shards hold {shape[0]}x{shape[1]} images with {shape[2]} channel(s) ({source}) "
                             f"but the model is {h}x{w} with {c}: set model.image_size={shape[0]} "
                             f"model.channels={shape[2]}, or convert the data with --size {h}")


def _first_image(url: str) -> np.ndarray:
    try:
        return decode_sample(next(iter(iter_samples([url]))))
    except StopIteration:
        raise ValueError(f"the first shard, {url}, holds no samples") from None
    except Exception as exc:  # noqa: BLE001 - whatever the tar reader or the URL's opener raised
        status = re.search(r"exit (\d+)", str(exc)) if url.startswith("pipe:") else None
        reason = (f"its command exited with status {status.group(1)}" if status
                  else (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])
        raise ValueError(f"cannot read the first shard, {url}: {reason}") from None


def resolve_data(data_cfg, model_cfg) -> tuple[str, int]:
    """(shard spec, number of samples or 0 if unknown) for a run. Empty data.shards = the embedded synthetic
    faces at the model's size, generated once into data.cache_dir."""
    spec = data_cfg.shards or str(ensure_synthetic(data_cfg.cache_dir, data_cfg.synth_num, model_cfg.image_size,
                                                   model_cfg.channels))
    num = data_cfg.num_samples
    if not num:
        info = read_info(spec)
        num = info.num_samples if info else 0
    return spec, num
