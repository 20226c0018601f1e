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

Faults. An unreadable shard (missing, truncated, not a tar) and an unusable sample (undecodable, another size or
channel count than the model's, an image mode with no 8-bit form) are counted and skipped, with a line for the
first few per slot. More than `max_bad_fraction` of a pass unusable (as soon as it is certain, where dataset.json
gives the pass's size), or a pass with no readable sample, stops the slot: it sends a LoaderFailure, one line,
instead of a batch, and the training process shuts its loader down and raises RunError. An exception would reach
it as a loader process's traceback, and a loader process blocked on its queue kept the training process from
exiting. A shard that ends early without an error (truncated at a member boundary) is caught by comparing each
pass's samples per shard with the counts dataset.json records: a warning once per shard, and the shortfall
counted. Counts travel with the batches to the training process.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import signal
import sys
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan_dist.data.images import to_unit_range
from dcgan_dist.data.shards import (
    ImagesNotShards,
    RawChunk,
    decode_label,
    decode_sample,
    expand_shards,
    is_url,
    iter_raw_chunks,
    iter_samples,
    read_classes,
    shard_counts,
    spec_parts,
)
from dcgan_dist.data.synth import available_cpus, ensure_synthetic
from dcgan_dist.errors import RunError

log = logging.getLogger("dcgan_dist.data")

# Fields of the per-batch info tensor that travels next to the images.
_COUNTERS = ("bad_samples", "bad_shards", "missing_samples")


# Unusable samples (undecodable, another size or channel count, an unsupported mode) a pass may hold before the
# run stops: data.max_bad_fraction's default. A few broken files in a large set are skipped and counted; a set
# of the wrong images is an error, not something to train on.
MAX_BAD_FRACTION = 0.05


SHOWN_WARNINGS = 3  # lines about skipped data per loader slot and run; the rest are counted


def shard_error_text(exc: BaseException) -> str:
    """One line for an error reading a shard: webdataset appends (stream, url) to the exception's arguments."""
    args = exc.args
    url = args[-1] if len(args) >= 2 and isinstance(args[-1], str) else None
    reason = args[0] if args and isinstance(args[0], str) else str(exc)
    reason = (reason.strip().splitlines() or [type(exc).__name__])[0][:200]
    return f"{os.path.basename(url)}: {reason}" if url else reason


@dataclass
class LoaderFailure:
    """What a loader slot sends instead of a batch when it cannot go on (too many unusable samples, no readable
    shard, an error of its own): one line, which the training process raises as RunError after it has shut its
    loader processes down."""

    message: str


class _BadSamples:
    """The unusable samples of one pass of a slot: how many, in which shards (first seen first), the first one."""

    def __init__(self):
        self.count = 0
        self.shards: list[str] = []
        self.first: str | None = None

    def add(self, url: str, reason: str, count: int = 1) -> None:
        self.count += count
        self.first = self.first or reason.splitlines()[0][:300]
        name = os.path.basename(url)
        if name not in self.shards:
            self.shards.append(name)

    def too_many(self, total: int, max_fraction: float) -> bool:
        return self.count > 0 and self.count > max_fraction * total

    def message(self, pass_index: int, where: str, total: int, max_fraction: float) -> str:
        shards = ", ".join(self.shards[:3]) + (f" and {len(self.shards) - 3} more" if len(self.shards) > 3 else "")
        return (
            f"{self.count} unusable sample(s) of {total} in pass {pass_index} ({where}), more than "
            f"data.max_bad_fraction={max_fraction:g}: in {shards}; the first: {self.first}; fix or remove those "
            "shards (`python -m dcgan_dist.data inspect` lists them), or raise data.max_bad_fraction"
        )


class _SlotReport:
    """The raw path's counts and warning lines of one loader slot (as _batches keeps them): counted only while
    `counting` (a resumed pass does not count again what it met before its position); warnings wait for the next
    batch, at most SHOWN_WARNINGS lines per slot and run."""

    def __init__(self, where: str):
        self.where = where
        self.counts = dict.fromkeys(_COUNTERS, 0)
        self.counting = True
        self.warned: set[str] = set()
        self.shard_errors: list[str] = []
        self.pending: list[str] = []
        self.shown = 0
        self.bad_reported = False

    def on_shard_error(self, exc: Exception) -> bool:
        reason = shard_error_text(exc)
        if len(self.shard_errors) < 3:
            self.shard_errors.append(reason)
        if self.counting:
            self.counts["bad_shards"] += 1
            if reason not in self.warned:
                self.warned.add(reason)
                self.pending.append(
                    f"skipping unreadable shard data ({self.where}), counted in metrics.jsonl's bad_shards: {reason}"
                )
        return True  # keep going with the next shard

    def bad(self, count: int) -> None:
        if self.counting:
            self.counts["bad_samples"] += count

    def first_bad(self, first: str | None) -> None:
        if first is not None and not self.bad_reported and self.counts["bad_samples"]:
            self.bad_reported = True
            self.pending.append(
                f"skipping unusable samples ({self.where}), each counted in metrics.jsonl's bad_samples; the "
                f"first: {first}"
            )

    def shortfall(self, url: str, got: int, want: int) -> None:
        if got < want:
            self.counts["missing_samples"] += want - got
            if url not in self.warned:
                self.warned.add(url)
                self.pending.append(
                    f"shard {url} gave {got} of its {want} samples (dataset.json); check it with "
                    "`python -m dcgan_dist.data inspect`"
                )

    def flush(self) -> None:
        for message in self.pending:
            self.shown += 1
            if self.shown <= SHOWN_WARNINGS:
                log.warning("%s", message)
            elif self.shown == SHOWN_WARNINGS + 1:
                log.warning(
                    "more unreadable shards or unusable samples (%s) are skipped and counted in metrics.jsonl, "
                    "without a line each",
                    self.where,
                )
        self.pending.clear()


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
    max_bad_fraction: float = MAX_BAD_FRACTION  # unusable samples a pass may hold (data.max_bad_fraction)
    # A labelled set's number of classes (dataset.json's classes): every sample then needs a label below it, and
    # batches carry the labels. 0: unlabelled, any label members ignored.
    num_classes: int = 0
    # A raw set (every part's dataset.json says format raw): batches are cut from whole chunks (_chunk_batches).
    raw_chunks: bool = False

    def _label(self, sample: dict) -> int | str:
        """A labelled set's sample's class index, or why it has none usable (a str)."""
        try:
            label = decode_label(sample)
        except ValueError as exc:
            return str(exc)
        if label is None or label >= self.num_classes:
            what = "no label" if label is None else f"label {label}"
            return (
                f"sample '{sample.get('__key__')}' in {sample.get('__url__')} has {what}, the set's dataset.json "
                f"has {self.num_classes} classes"
            )
        return label

    def _unusable(self, array: np.ndarray, sample: dict) -> str | None:
        """Why a decoded image cannot be trained on (another size or channel count than the model's), or None."""
        if self.expect_chw is None:
            return None
        c, h, w = self.expect_chw
        if array.shape == (h, w, c):
            return None
        return (
            f"sample '{sample.get('__key__')}' in {sample.get('__url__')}: {array.shape[0]}x{array.shape[1]} with "
            f"{array.shape[2]} channel(s), the model expects {h}x{w} with {c}"
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...] | LoaderFailure]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        slot = (worker + self.slot_offset) % self.num_slots
        where = f"rank {self.rank}, loader slot {slot}"
        # Whatever stops this slot reaches the training process as one line, in the stream (an exception would
        # arrive there as a worker's traceback); it shuts the loader down and ends the run (RunError).
        try:
            yield from (self._chunk_batches if self.raw_chunks else self._batches)(slot, where)
        except MemoryError:
            yield LoaderFailure(
                f"out of memory in the data loader ({where}): lower train.batch_size, "
                "data.shuffle_buffer or data.num_workers"
            )
        except RunError as exc:  # already the run's one line (an object store that stopped answering, say)
            yield LoaderFailure(str(exc))
        except Exception as exc:  # noqa: BLE001 - any: one line instead of a loader process's traceback
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            yield LoaderFailure(f"the data loader failed ({where}): {type(exc).__name__}: {reason}")

    def _batches(self, slot: int, where: str) -> Iterator[tuple[torch.Tensor, ...] | LoaderFailure]:
        urls = self.rank_urls[slot :: self.num_slots]
        pass_index, skip = self.positions.get(slot, (0, 0))
        counts = dict.fromkeys(_COUNTERS, 0)
        warned: set[str] = set()
        shard_errors: list[str] = []
        # Warnings wait for the next batch: a slot that stops instead says it all in its one line. At most
        # SHOWN_WARNINGS of them per slot and run; every unusable sample and unreadable shard is counted.
        pending: list[str] = []
        shown = 0
        first_bad_reported = False

        def on_shard_error(exc: Exception) -> bool:
            counts["bad_shards"] += 1
            reason = shard_error_text(exc)
            if len(shard_errors) < 3:
                shard_errors.append(reason)
            if reason not in warned:
                warned.add(reason)
                pending.append(
                    f"skipping unreadable shard data ({where}), counted in metrics.jsonl's bad_shards: {reason}"
                )
            return True  # keep going with the next shard

        def flush_warnings() -> None:
            nonlocal shown
            for message in pending:
                shown += 1
                if shown <= SHOWN_WARNINGS:
                    log.warning("%s", message)
                elif shown == SHOWN_WARNINGS + 1:
                    log.warning(
                        "more unreadable shards or unusable samples (%s) are skipped and counted in "
                        "metrics.jsonl, without a line each",
                        where,
                    )
            pending.clear()

        last_resized_pass = max((p for p, _ in self.trained_before.values()), default=-1)
        batch: list[np.ndarray] = []
        batch_ids: list[tuple[int, int, int]] = []  # (pass, shard id, ordinal) of each image in `batch`
        batch_labels: list[int] = []  # a labelled set's class of each image in `batch`
        while True:
            rng = random.Random(slot_seed(self.seed, self.rank, slot, pass_index))
            order = list(urls)
            rng.shuffle(order)
            # A shard the ledger has in a later pass already had this one in full.
            order = [u for u in order if self.trained_before.get(u, (pass_index,))[0] <= pass_index]
            shuffle = wds.filters.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)
            per_shard = dict.fromkeys(order, 0)
            samples = shuffle(self._untrained(iter_samples(order, handler=on_shard_error), pass_index, per_shard))
            # The pass's size where dataset.json knows every shard's: then too many unusable samples stop the
            # slot as soon as they are too many, before a batch of what is left; else at the end of the pass.
            known = all(u in self.shard_counts for u in order)
            pass_total = sum(self.shard_counts[u] for u in order) if known else None
            bad = _BadSamples()
            consumed = 0
            for consumed, sample in enumerate(samples, 1):
                if consumed <= skip:
                    continue  # resuming: already trained on; skipped without decoding
                label: int | str = -1
                try:
                    array = decode_sample(sample)
                    reason = self._unusable(array, sample)
                except ValueError as exc:
                    reason = str(exc)
                if reason is None and self.num_classes:
                    label = self._label(sample)
                    reason = label if isinstance(label, str) else None
                if reason is not None:
                    counts["bad_samples"] += 1
                    bad.add(sample["__url__"], reason)
                    # (what was read counts too, should dataset.json understate the pass)
                    if pass_total is not None and bad.too_many(max(pass_total, consumed), self.max_bad_fraction):
                        yield LoaderFailure(
                            bad.message(pass_index, where, max(pass_total, consumed), self.max_bad_fraction)
                        )
                        return
                    continue
                batch.append(array)
                batch_ids.append((pass_index, self.shard_ids.get(sample["__url__"], -1), sample["__index__"]))
                batch_labels.append(int(label))
                if len(batch) == self.batch_size:
                    if bad.first is not None and not first_bad_reported:
                        first_bad_reported = True
                        pending.append(
                            f"skipping unusable samples ({where}), each counted in metrics.jsonl's "
                            f"bad_samples; the first: {bad.first}"
                        )
                    flush_warnings()
                    # One copy on this side: the batch stays in the shards' channels-last layout, and the device
                    # that trains on it rearranges it (normalise), where that is cheap.
                    images = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
                    meta = torch.tensor([slot, pass_index, consumed, *(counts[k] for k in _COUNTERS)])
                    counts = dict.fromkeys(_COUNTERS, 0)
                    # An unlabelled set's batches carry an empty label tensor (ImageBatches yields None).
                    labels = torch.tensor(batch_labels if self.num_classes else [], dtype=torch.int64)
                    yield images, meta, torch.tensor(batch_ids), labels
                    batch, batch_ids, batch_labels = [], [], []
            failure = self._pass_failure(
                consumed, pass_index > last_resized_pass, order, where, shard_errors, pass_total, bad, pass_index
            )
            if failure is not None:
                yield failure
                return
            for url, got in per_shard.items():  # a shard that ended early (truncated at a member boundary)
                want = self.shard_counts.get(url, got)
                if got < want:
                    counts["missing_samples"] += want - got
                    if url not in warned:
                        warned.add(url)
                        pending.append(
                            f"shard {url} gave {got} of its {want} samples (dataset.json); check it with "
                            "`python -m dcgan_dist.data inspect`"
                        )
            pass_index, skip = pass_index + 1, 0

    def _chunk_batches(self, slot: int, where: str) -> Iterator[tuple[torch.Tensor, ...] | LoaderFailure]:
        """The raw path (raw_chunks): whole chunks in, batches cut out by indexing, no per-image Python.

        A pass reads its shards' chunks (shard order shuffled as in _batches) into a pool of the images of whole
        chunks, views of the mapped shards, never copied; each chunk added, the pool is permuted by the pass's
        seeded generator and what it holds beyond `shuffle_buffer` images is emitted, so each image leaves at a
        uniformly random place among those held; the pass's last pool is permuted and emitted whole. Batches are
        cut from the emitted order (the last one of a pass finishes with the next pass's first images), and each
        is gathered from its chunks with one copy, grouped by chunk within the batch. A batch's position is
        (pass, images of the pass emitted up to its end); a resumed pass reads its chunks again and leaves its
        first `skip` emitted images out, uncopied. The ledger, unusable samples (a damaged chunk is one), unreadable
        shards and shortfalls as in _batches; what a resumed pass meets before its position is not counted again.
        """
        urls = self.rank_urls[slot :: self.num_slots]
        pass_index, skip = self.positions.get(slot, (0, 0))
        report = _SlotReport(where)
        last_resized_pass = max((p for p, _ in self.trained_before.values()), default=-1)
        chunks: dict[int, np.ndarray] = {}  # chunk id -> its images N x H x W x C (a view of the mapped shard)
        next_chunk = 0
        ready = _Ready(self.batch_size, self.num_classes > 0)
        while True:
            rng = random.Random(slot_seed(self.seed, self.rank, slot, pass_index))
            order = list(urls)
            rng.shuffle(order)
            order = [u for u in order if self.trained_before.get(u, (pass_index,))[0] <= pass_index]
            generator = np.random.default_rng(rng.getrandbits(63))
            known = all(u in self.shard_counts for u in order)
            pass_total = sum(self.shard_counts[u] for u in order) if known else None
            per_shard = dict.fromkeys(order, 0)
            bad = _BadSamples()
            pool = np.zeros((0, 5), np.int64)  # images read and not yet emitted, one row each (_CHUNK ... _LABEL)
            emitted = 0  # images of this pass emitted, the first `skip` of them left out (trained before)
            read = 0  # images of this pass read (a damaged chunk: one), less what the ledger left out
            report.counting = skip == 0
            for chunk in iter_raw_chunks(order, handler=report.on_shard_error):
                per_shard[chunk.url] = per_shard.get(chunk.url, 0) + chunk.count
                rows, unusable, reason = self._usable_rows(chunk, pass_index)
                read += len(rows) + unusable
                if unusable:
                    bad.add(chunk.url, reason or "", unusable)
                    report.bad(unusable)
                    if pass_total is not None and bad.too_many(max(pass_total, read), self.max_bad_fraction):
                        yield LoaderFailure(
                            bad.message(pass_index, where, max(pass_total, read), self.max_bad_fraction)
                        )
                        return
                if len(rows):
                    assert chunk.images is not None  # rows were cut from it
                    chunks[next_chunk] = chunk.images
                    block = np.empty((len(rows), 5), np.int64)
                    block[:, _CHUNK], block[:, _ROW] = next_chunk, rows
                    block[:, _SHARD], block[:, _ORDINAL] = self.shard_ids.get(chunk.url, -1), chunk.first + rows
                    block[:, _LABEL] = chunk.labels[rows] if chunk.labels is not None else -1
                    pool = np.concatenate([pool, block])
                    next_chunk += 1
                out = len(pool) - self.shuffle_buffer
                if out <= 0:
                    continue
                pool = pool[generator.permutation(len(pool))]
                drop = min(out, max(0, skip - emitted))
                emitted += out
                report.counting = emitted >= skip
                ready.add(pool[drop:out], pass_index)
                pool = pool[out:]
                for batch, offset in ready.batches(chunks, emitted, pass_index):
                    yield self._with_meta(batch, report, bad, slot, pass_index, offset)
                _drop_unused(chunks, pool[:, _CHUNK], ready.images[:, _CHUNK])
            # The pass's last images, in a random order.
            pool = pool[generator.permutation(len(pool))]
            drop = min(len(pool), max(0, skip - emitted))
            emitted += len(pool)
            report.counting = True
            ready.add(pool[drop:], pass_index)
            for batch, offset in ready.batches(chunks, emitted, pass_index):
                yield self._with_meta(batch, report, bad, slot, pass_index, offset)
            _drop_unused(chunks, ready.images[:, _CHUNK])
            failure = self._pass_failure(
                read, pass_index > last_resized_pass, order, where, report.shard_errors, pass_total, bad, pass_index
            )
            if failure is not None:
                yield failure
                return
            for url, got in per_shard.items():  # a shard that ended early (truncated at a member boundary)
                report.shortfall(url, got, self.shard_counts.get(url, got))
            pass_index, skip = pass_index + 1, 0

    def _usable_rows(self, chunk: RawChunk, pass_index: int) -> tuple[np.ndarray, int, str | None]:
        """(rows of a chunk to train on, how many more are unusable, why) less those the ledger of a resized run
        says were trained in this pass."""
        rows = np.arange(chunk.count)
        before = self.trained_before.get(chunk.url)
        if before is not None and before[0] == pass_index and len(before[1]):
            ordinals = chunk.first + rows
            trained = before[1][np.minimum(ordinals, len(before[1]) - 1)] & (ordinals < len(before[1]))
            rows = rows[~trained]
        if not len(rows):
            return rows, 0, None
        if chunk.images is None:
            return rows[:0], len(rows), chunk.error
        n, h, w, c = chunk.images.shape
        if self.expect_chw is not None and (h, w, c) != tuple(self.expect_chw[1:]) + (self.expect_chw[0],):
            ec, eh, ew = self.expect_chw
            return (
                rows[:0],
                len(rows),
                (
                    f"sample '{chunk.key}' in {chunk.url}: {h}x{w} with {c} channel(s), the model expects {eh}x{ew} "
                    f"with {ec}"
                ),
            )
        if self.num_classes:
            if chunk.labels is None:
                return (
                    rows[:0],
                    len(rows),
                    chunk.label_error
                    or (
                        f"sample '{chunk.key}' in {chunk.url} has no label, the set's dataset.json has "
                        f"{self.num_classes} classes"
                    ),
                )
            labels = chunk.labels[rows]
            ok = (labels >= 0) & (labels < self.num_classes)
            if not ok.all():
                first = int(np.flatnonzero(~ok)[0])
                return (
                    rows[ok],
                    int(np.count_nonzero(~ok)),
                    (
                        f"sample '{chunk.key}/{rows[first]}' in {chunk.url} has label {labels[first]}, the set's "
                        f"dataset.json has {self.num_classes} classes"
                    ),
                )
        return rows, 0, None

    def _pass_failure(
        self,
        read: int,
        must_read: bool,
        order: list[str],
        where: str,
        shard_errors: list[str],
        pass_total: int | None,
        bad: _BadSamples,
        pass_index: int,
    ) -> LoaderFailure | None:
        """At the end of a pass (either reader): nothing readable in the slot's shards (must_read: not a pass a
        resize left empty), or too many unusable samples over the whole pass (a resumed, or after a resize
        shortened, pass counts what it skipped as read)."""
        if read == 0 and must_read:
            names = ", ".join(os.path.basename(u) for u in order[:3]) + (", ..." if len(order) > 3 else "")
            return LoaderFailure(
                f"no readable samples in the {len(order)} shard(s) of {where} ({names}): "
                f"{shard_errors[0] if shard_errors else 'they hold no samples'}; check them with "
                "`python -m dcgan_dist.data inspect`"
            )
        pass_size = max(read, pass_total or 0)
        if bad.too_many(pass_size, self.max_bad_fraction):
            return LoaderFailure(bad.message(pass_index, where, pass_size, self.max_bad_fraction))
        return None

    def _with_meta(self, batch, report: _SlotReport, bad: _BadSamples, slot: int, pass_index: int, offset: int):
        """A cut batch as the stream yields it, with its position and the counts since the last one."""
        images, ids, labels = batch
        report.first_bad(bad.first)
        report.flush()
        meta = torch.tensor([slot, pass_index, offset, *(report.counts[k] for k in _COUNTERS)])
        report.counts = dict.fromkeys(_COUNTERS, 0)
        labels = torch.from_numpy(labels) if labels is not None else torch.zeros(0, dtype=torch.int64)
        return torch.from_numpy(images).permute(0, 3, 1, 2), meta, torch.from_numpy(ids), labels

    def _untrained(self, samples: Iterator[dict], pass_index: int, per_shard: dict[str, int]) -> Iterator[dict]:
        """Count what each shard gives, and leave out what the ledger of a resized run says was trained in this
        pass already (by each sample's ordinal in its shard, `__index__`)."""
        url, trained = None, None
        for sample in samples:
            shard: str = sample["__url__"]
            if shard != url:
                url = shard
                before = self.trained_before.get(url)
                trained = before[1] if before is not None and before[0] == pass_index else None
            per_shard[shard] = per_shard.get(shard, 0) + 1
            index = sample["__index__"]
            if trained is not None and index < len(trained) and trained[index]:
                continue
            yield sample


# Columns of the raw path's per-image bookkeeping (_chunk_batches' pool, _Ready): the chunk an image is in, its row
# there, its shard id, its ordinal in that shard, its class (-1: unlabelled set); _Ready adds its pass.
_CHUNK, _ROW, _SHARD, _ORDINAL, _LABEL, _PASS = range(6)


def _drop_unused(chunks: dict[int, np.ndarray], *in_use: np.ndarray) -> None:
    """Let go of the chunks no pooled or ready image is in (their mapped pages stay in the page cache)."""
    live = set(np.unique(np.concatenate(in_use)).tolist())
    for cid in [cid for cid in chunks if cid not in live]:
        del chunks[cid]


class _Ready:
    """The raw path's emitted images not yet batched (a pass's leftover first), one row each (_CHUNK ... _PASS),
    and the batches cut from them."""

    def __init__(self, batch_size: int, labelled: bool):
        self.batch_size, self.labelled = batch_size, labelled
        self.images = np.zeros((0, 6), np.int64)

    def add(self, pooled: np.ndarray, pass_index: int) -> None:
        """Emitted pool rows (_CHUNK ... _LABEL) of pass `pass_index`."""
        block = np.empty((len(pooled), 6), np.int64)
        block[:, :_PASS], block[:, _PASS] = pooled, pass_index
        self.images = np.concatenate([self.images, block])

    def batches(self, chunks: dict, emitted: int, pass_index: int):
        """Each full batch that is ready, with its position: this pass's images emitted up to its end."""
        while len(self.images) >= self.batch_size:
            batch = self._cut(chunks, self.images[: self.batch_size])
            self.images = self.images[self.batch_size :]
            yield batch, emitted - int(np.count_nonzero(self.images[:, _PASS] == pass_index))

    def _cut(self, chunks: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """A batch's images gathered from their chunks, one copy, grouped by chunk: (images B x H x W x C,
        ids B x (pass, shard id, ordinal), labels or None)."""
        rows = rows[np.argsort(rows[:, _CHUNK], kind="stable")]
        size = len(rows)
        bounds = [0, *(np.flatnonzero(np.diff(rows[:, _CHUNK])) + 1).tolist(), size]
        images = np.empty((size, *chunks[int(rows[0, _CHUNK])].shape[1:]), np.uint8)
        for start, end in zip(bounds[:-1], bounds[1:]):
            # mode="clip" (the rows are in range): numpy buffers `out` under the default "raise", a second copy
            # that costs a third of the loader's time
            np.take(chunks[int(rows[start, _CHUNK])], rows[start:end, _ROW], axis=0, out=images[start:end], mode="clip")
        labels = rows[:, _LABEL].copy() if self.labelled else None
        return images, rows[:, [_PASS, _SHARD, _ORDINAL]], labels


# data.cache=device: the slice is cached where it fits in this fraction of the free memory of the device.
CACHE_FRACTION = 0.5


def free_memory(device: torch.device) -> int:
    """Bytes free for a cache on `device`: torch.cuda.mem_get_info on CUDA, MemAvailable of the host otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


class DeviceCache:
    """data.cache=device: the rank's decoded uint8 images (and labels) on the training device, in the order of
    their (shard id, ordinal), and the passes drawn from them.

    The first pass streams as data.cache=off does, and its images are kept as they go by. Once every loader slot
    is past the pass it started in, batches come from the cache: pass p is a permutation of the cached samples
    drawn from (seed, rank, p) (numpy, so the same on every device), the passes one after the other (a batch
    may finish one and start the next, as streamed ones do); the first cached pass leaves out the samples the
    stream already gave in it. `drawn` (cached batches so far), the first cached pass and those samples are the
    whole state: a resume rebuilds the cache by reading the rank's shards once (not trained on) and continues
    with the next batch of the same sequence. Every cached batch is entered in the ledger like a streamed one, so
    a resize re-deals the shards as always: the cache is dropped and rebuilt from the new slice, and its passes
    go on without what the ledger says was trained."""

    def __init__(self, seed: int, rank: int, batch_size: int, device: torch.device):
        self.seed, self.rank, self.batch_size, self.device = seed, rank, batch_size, torch.device(device)
        self.filled = False  # the cache holds the whole slice
        self.active = False  # batches come from the cache
        self.first_pass: dict[int, int] = {}  # slot -> the pass of its first streamed batch
        self.seen: list[tuple[int, int]] = []  # (pass, key) of samples streamed after a slot's first pass
        self.start_pass = 0  # the first cached pass
        self.drawn = 0
        self._parts: list[tuple[torch.Tensor, np.ndarray, torch.Tensor | None]] = []
        self._perms: dict[int, np.ndarray] = {}
        self._on_device: dict[int, torch.Tensor] = {}  # CUDA: _perms' entries on the device

    @staticmethod
    def keys(ids: np.ndarray) -> np.ndarray:
        return ids[:, 1] * (1 << 32) + ids[:, 2]

    def keep(self, images: torch.Tensor, ids: np.ndarray, labels: torch.Tensor | None, first: int) -> None:
        """A streamed batch: its samples of their slot's first pass (`first`: of pass 0 ... as the ids say)."""
        take = ids[:, 0] == first
        if not take.any():
            return
        hwc = images.permute(0, 2, 3, 1).numpy()  # N x H x W x C, as the shards hold them (the batch's memory)
        kept = torch.from_numpy(hwc[take] if not take.all() else hwc.copy()).to(self.device)
        kept_labels = torch.from_numpy(labels.numpy()[take]).to(self.device) if labels is not None else None
        self._parts.append((kept, self.keys(ids[take]), kept_labels))

    def finish(self) -> None:
        """The whole slice kept: into one tensor, in key order (so the order does not depend on the stream's).
        Each kept part is written into its place and let go, so the peak is about twice the slice (the part list
        and the tensor): CACHE_FRACTION leaves room for it."""
        keys = np.unique(np.concatenate([k for _, k, _ in self._parts]))  # a sample kept twice (read twice): once
        first_images, _, first_labels = self._parts[0]
        self.images = torch.empty((len(keys), *first_images.shape[1:]), dtype=torch.uint8, device=self.device)
        labelled = first_labels is not None
        self.labels = torch.empty(len(keys), dtype=torch.int64, device=self.device) if labelled else None
        parts, self._parts = self._parts, []
        while parts:
            images, part_keys, labels = parts.pop(0)
            where = np.searchsorted(keys, part_keys)
            if self.device.type == "cpu":  # numpy: torch's indexing of uint8 rows is slow here
                self.images.numpy()[where] = images.numpy()
                if self.labels is not None and labels is not None:
                    self.labels.numpy()[where] = labels.numpy()
            else:
                index = torch.from_numpy(where).to(self.device)
                self.images[index] = images
                if self.labels is not None and labels is not None:
                    self.labels[index] = labels
            del images, labels
        self.sample_keys = keys
        self.filled = True

    def start(self, start_pass: int) -> None:
        self.start_pass, self.active = start_pass, True

    def _perm(self, pass_index: int) -> np.ndarray:
        """The cached samples (indices) of a pass in its order; the first cached pass without what was seen."""
        perm = self._perms.get(pass_index)
        if perm is None:
            perm = np.random.default_rng(slot_seed(self.seed, self.rank, 1 << 20, pass_index)).permutation(
                len(self.sample_keys)
            )
            if pass_index == self.start_pass and self.seen:
                seen = np.array([k for p, k in self.seen if p == pass_index], dtype=np.int64)
                perm = perm[~np.isin(self.sample_keys[perm], seen)]
            self._perms = {p: v for p, v in self._perms.items() if p >= pass_index - 1}
            self._perms[pass_index] = perm
        return perm

    def _device_perm(self, pass_index: int) -> torch.Tensor:
        """A pass's permutation on the device, copied there once per pass."""
        perm = self._perm(pass_index)
        cached = self._on_device.get(pass_index)
        if cached is None:
            cached = torch.from_numpy(perm).to(self.device)
            self._on_device = {p: v for p, v in self._on_device.items() if p >= pass_index - 1}
            self._on_device[pass_index] = cached
        return cached

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray]:
        """(images B x C x H x W over channels-last memory, labels or None, ids B x (pass, shard, ordinal))."""
        position, pass_index = self.drawn * self.batch_size, self.start_pass
        while position >= len(self._perm(pass_index)):
            position -= len(self._perm(pass_index))
            pass_index += 1
        picked, passes, spans = [], [], []
        need = self.batch_size
        while need:
            part = self._perm(pass_index)[position : position + need]
            picked.append(part)
            passes.append(np.full(len(part), pass_index))
            spans.append((pass_index, position, position + len(part)))
            need -= len(part)
            position, pass_index = 0, pass_index + 1
        index_np = np.concatenate(picked)
        keys = self.sample_keys[index_np]
        ids = np.stack([np.concatenate(passes), keys >> 32, keys & 0xFFFFFFFF], axis=1)
        self.drawn += 1
        if self.device.type == "cpu":  # numpy's gather copies whole rows; torch's indexing goes byte by byte
            images = torch.from_numpy(np.take(self.images.numpy(), index_np, axis=0))
            labels = torch.from_numpy(self.labels.numpy()[index_np]) if self.labels is not None else None
        else:  # the index from the pass's permutation already on the device: no blocking host-to-device copy
            index = torch.cat([self._device_perm(p)[a:b] for p, a, b in spans])
            images, labels = self.images[index], (self.labels[index] if self.labels is not None else None)
        return images.permute(0, 3, 1, 2), labels, ids

    def state_dict(self) -> dict:
        return {
            "active": self.active,
            "first_pass": {str(k): v for k, v in self.first_pass.items()},
            "seen": [list(s) for s in self.seen],
            "start_pass": self.start_pass,
            "drawn": self.drawn,
        }

    def load_state_dict(self, state: dict) -> None:
        self.active = bool(state["active"])
        self.first_pass = {int(k): int(v) for k, v in state["first_pass"].items()}
        self.seen = [(int(p), int(k)) for p, k in state["seen"]]
        self.start_pass, self.drawn = int(state["start_pass"]), int(state["drawn"])


@dataclass
class LoaderCounters:
    batches: int = 0
    bad_samples: int = 0  # undecodable images, skipped
    bad_shards: int = 0  # read errors (missing, truncated mid-member, not a tar), per pass
    missing_samples: int = 0  # samples that shards did not give although dataset.json counts them, per pass


class ImageBatches:
    """Iterator of (images, labels) batches for one rank, with a resumable position: images uint8 B x C x H x W
    in channels-last memory (`normalise` rearranges them on the device), labels the samples' classes as an
    int64 tensor of shape (B,) when the shards are labelled (dataset.json's `classes`: read_classes), else None.

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
        max_bad_fraction: float = MAX_BAD_FRACTION,
        cache: str = "off",
        device: torch.device | str = "cpu",
    ):
        # What a cache's filling pass needs to read the same slice again (DeviceCache).
        self._args: dict[str, Any] = dict(
            shards=shards,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            expect_chw=expect_chw,
            max_bad_fraction=max_bad_fraction,
        )
        urls = expand_shards(shards) if isinstance(shards, str) else list(shards)
        self.classes = read_classes(shards) if isinstance(shards, str) else None
        counts, missing = shard_counts(shards) if isinstance(shards, str) else ({}, [])
        if rank == 0 and isinstance(shards, str):
            unlisted = [part for part, info in spec_parts(shards) if info is None and not is_url(part)]
            if unlisted:  # hand-made shards load without it, but a shortfall in them cannot be noticed
                log.warning(
                    "no dataset.json beside %s (%d shard(s)): how many samples each shard should give is "
                    "unknown, so a truncated one goes unnoticed; `python -m dcgan_dist.data inspect` counts "
                    "them",
                    ", ".join(unlisted[:3]),
                    sum(len(expand_shards(part)) for part in unlisted),
                )
        if missing:
            log.warning(
                "dataset.json lists %d shard(s) that are gone (%d samples): %s",
                len(missing),
                sum(counts[m] for m in missing),
                ", ".join(os.path.basename(m) for m in missing[:5]),
            )
        rank_urls = split_for_rank(urls, rank, world_size)
        cpus = available_cpus()
        if num_workers > cpus:  # more would only share the cores (and torch warns, twice)
            if rank == 0:
                log.warning(
                    "data.num_workers=%d but this process may use %d CPU(s): using %d loader worker(s)",
                    num_workers,
                    cpus,
                    cpus,
                )
            num_workers = cpus
        # A slot needs at least one shard of its own, so a rank never runs more loader workers than shards.
        self.num_slots = max(1, min(num_workers, len(rank_urls))) if num_workers > 0 else 1
        if num_workers > self.num_slots:
            log.warning(
                "rank %d has %d shard(s): using %d loader worker(s) instead of %d",
                rank,
                len(rank_urls),
                self.num_slots,
                num_workers,
            )
        self.num_workers, self.pin_memory, self.rank = num_workers, pin_memory, rank
        self.urls, self.rank_urls = urls, rank_urls
        self.stream = ShardStream(
            rank_urls,
            batch_size,
            rank,
            seed,
            self.num_slots,
            shuffle_buffer,
            expect_chw,
            shard_counts=counts,
            shard_ids={u: i for i, u in enumerate(urls)},
            max_bad_fraction=max_bad_fraction,
            num_classes=len(self.classes or []),
            raw_chunks=isinstance(shards, str) and all(info and info.format == "raw" for _, info in spec_parts(shards)),
        )
        self.layout = {
            "world_size": world_size,
            "rank": rank,
            "slots": self.num_slots,
            "batch_size": batch_size,
            "seed": seed,
            # Raw sets are batched from whole chunks, where a position counts other things: a checkpoint of the
            # per-image reader resumes through the ledger, like a resize.
            **({"reader": "chunks"} if self.stream.raw_chunks else {}),
        }
        self.counters = LoaderCounters()
        self.positions: dict[int, tuple[int, int]] = {}
        self.ledger: dict[int, tuple[int, np.ndarray]] = {}  # shard id -> (pass, trained[ordinal]) of this rank
        self._it: Iterator | None = None
        self.last_slot, self.last_ids = 0, np.zeros((0, 3), np.int64)  # the latest streamed batch's
        # data.cache: the decision is made once per run. A fresh run's is made here (and printed before the first
        # batch); a resume of the same layout under the same setting keeps the checkpoint's (load_rank_states).
        self.cache_setting = cache
        self._cache_args = (seed, batch_size, torch.device(device))
        self._announce: str | None = None  # the decision's line, printed once, before the first batch
        self.cache = self._cache_decision(counts, expect_chw) if cache in ("device", "auto") else None
        self._needs_fill = False  # a resumed cache is filled by a pass of its own first

    def _cache_decision(self, counts, expect_chw) -> DeviceCache | None:
        """data.cache=device or auto: a DeviceCache if the rank's slice fits in CACHE_FRACTION of the device's free
        memory, else None; the decision is printed either way (before the first batch)."""
        seed, batch_size, device = self._cache_args
        known = expect_chw is not None and all(u in counts for u in self.rank_urls)
        what = f"data.cache={self.cache_setting} (rank {self.rank})"
        if not known:
            self._announce = f"{what}: not cached, the slice's size is unknown (no dataset.json): streamed every pass"
            return None
        c, h, w = expect_chw
        samples = sum(counts[u] for u in self.rank_urls)
        need = samples * (c * h * w + 8)
        free = free_memory(device)
        fits = need <= CACHE_FRACTION * free
        self._announce = (
            f"{what}: {samples} images need {need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB free on {device}: "
            + ("cached after the first pass" if fits else f"not cached (more than {CACHE_FRACTION:g} of it)")
        )
        return DeviceCache(seed, self.rank, batch_size, device) if fits else None

    def _resume_cache_decision(self, mine: dict) -> bool:
        """A resume of this layout: the checkpoint's cache decision where it was made under this setting (a
        checkpoint without the record: device where it cached, else off). Streamed stays streamed,
        even where the slice would fit now (a bit-exact resume); cached is cached again (rebuilt), unless the slice
        does not fit now. A changed setting is a new decision (the one made in __init__). True when the checkpoint
        cached and this run does not: its stream positions are then behind what it trained (load_rank_states)."""
        cached = "cache" in mine
        saved = mine.get("cache_setting", "device" if cached else "off")  # before the record: what it did says
        what = f"data.cache={self.cache_setting} (rank {self.rank})"
        if saved != self.cache_setting:
            if self._announce is None:  # data.cache=off now
                self._announce = f"{what}: streamed every pass"
            self._announce += f" (a new decision: the checkpoint's run had data.cache={saved})"
        elif not cached and self.cache is not None:
            self.cache = None
            self._announce = f"{what}: not cached, as the checkpoint's run (streamed every pass, a bit-exact resume)"
        elif cached and self.cache is not None:
            self._announce = f"{what}: cached, as the checkpoint's run (rebuilt by reading the slice once)"
        return cached and self.cache is None

    def _start(self) -> Iterator:
        # Rotating the slots' roles on resume keeps the DataLoader's round-robin order that of the interrupted run.
        self.stream.positions, self.stream.slot_offset = dict(self.positions), self.counters.batches % self.num_slots
        workers = self.num_slots if self.num_workers > 0 else 0
        if workers:
            _quiet_about_dead_loader_processes()
        return iter(
            DataLoader(
                self.stream,
                batch_size=None,  # the stream batches itself
                num_workers=workers,
                pin_memory=self.pin_memory,
                prefetch_factor=4 if workers else None,
                persistent_workers=False,
                worker_init_fn=_loader_worker_init if workers else None,
            )
        )

    def __iter__(self) -> ImageBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._announce is not None:
            print(self._announce, flush=True)
            self._announce = None
        cache = self.cache
        if cache is not None and self._needs_fill:
            self._needs_fill = False
            self._fill()
        if cache is not None and cache.active:
            images, labels, ids = cache.next_batch()
            self.counters.batches += 1
            self._mark_trained(ids)
            return images, (labels if self.classes else None)
        if self._it is None:
            self._it = self._start()
        try:
            item = next(self._it)
        except StopIteration:
            raise
        except Exception as exc:  # noqa: BLE001 - the DataLoader's own (a loader process killed, say): one line
            reason = (str(exc).strip().splitlines() or [""])[0][:300]
            item = LoaderFailure(
                f"the data loader failed (rank {self.rank}): {type(exc).__name__}: {reason}; was a "
                "loader process killed (out of memory?): the same command resumes from the newest "
                "checkpoint"
            )
        if isinstance(item, LoaderFailure):
            # Outside the except block: no traceback keeps the DataLoader's iterator, so the loader processes are
            # shut down here, before the run ends.
            self.close()
            raise RunError(item.message)
        images, meta, ids, labels = item
        slot, pass_index, offset, *counts = (int(v) for v in meta.tolist())
        self.positions[slot] = (pass_index, offset)
        self.counters.batches += 1
        for name, value in zip(_COUNTERS, counts):
            setattr(self.counters, name, getattr(self.counters, name) + value)
        self.last_slot, self.last_ids = slot, ids.numpy()
        self._mark_trained(self.last_ids)
        if cache is not None:
            self._cache_streamed(images, labels if self.classes else None)
        return images, (labels if self.classes else None)

    def _cache_streamed(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """A streamed batch seen by the cache: kept while it fills, and the switch to cached batches once every
        slot is past the pass it started in."""
        cache, ids, slot = self.cache, self.last_ids, self.last_slot
        assert cache is not None  # data.cache=device
        first = cache.first_pass.setdefault(slot, int(ids[:, 0].min()))
        if not cache.filled:
            cache.keep(images, ids, labels, first)
        later = ids[:, 0] > first
        cache.seen += list(zip(ids[later, 0].tolist(), DeviceCache.keys(ids[later]).tolist()))
        done = len(cache.first_pass) == self.num_slots and all(
            self.positions[s][0] > p for s, p in cache.first_pass.items()
        )
        if done:
            if not cache.filled:
                cache.finish()
            cache.start(min(self.positions[s][0] for s in cache.first_pass))
            self.close()  # the stream's loader processes are not needed any more

    def _fill(self) -> None:
        """A resumed cache: the rank's slice read once (a pass of a loader of its own, not trained on)."""
        cache = self.cache
        assert cache is not None  # data.cache=device
        reader = ImageBatches(**self._args)
        firsts: dict[int, int] = {}
        try:
            while True:
                images, labels = next(reader)
                first = firsts.setdefault(reader.last_slot, int(reader.last_ids[:, 0].min()))
                cache.keep(images, reader.last_ids, labels, first)
                if len(firsts) == reader.num_slots and all(reader.positions[s][0] > p for s, p in firsts.items()):
                    break
        finally:
            reader.close()
        cache.finish()

    def _mark_trained(self, ids: np.ndarray) -> None:
        """Enter a batch's (pass, shard id, ordinal) rows in the ledger: one group per (shard, pass) in the batch
        (a batch that spans the end of a pass holds two passes)."""
        groups, which = np.unique(ids[:, 1] * (1 << 32) + ids[:, 0], return_inverse=True)
        for group, key in enumerate(groups.tolist()):
            shard, pass_index = key >> 32, key & 0xFFFFFFFF
            ordinals = ids[which == group, 2] if len(groups) > 1 else ids[:, 2]
            entry = self.ledger.get(shard)
            if entry is None or entry[0] < pass_index:  # the shard's first sample of a new pass
                entry = (pass_index, np.zeros(0, dtype=bool))
            trained = entry[1]
            top = int(ordinals.max())
            if top >= len(trained):
                trained = np.concatenate([trained, np.zeros(top + 1 - len(trained), dtype=bool)])
            trained[ordinals] = True
            self.ledger[shard] = (entry[0], trained)

    def state_dict(self) -> dict:
        return {
            "layout": dict(self.layout),
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "batches": self.counters.batches,
            "ledger": _ledger_to_state({self.urls[i]: entry for i, entry in self.ledger.items()}),
            # What this layout's streams started without (a resized run); an exact resume needs it again.
            "trained_before": _ledger_to_state(self.stream.trained_before),
            # The run's cache decision: the setting it was made under, and "cache" where this rank caches.
            "cache_setting": self.cache_setting,
            **({"cache": self.cache.state_dict()} if self.cache is not None else {}),
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
        self._needs_fill = self.cache is not None  # whatever the state, a resumed cache is read anew
        if mine is not None and mine.get("layout") == self.layout:
            uncached = self._resume_cache_decision(mine)
            self._needs_fill = self.cache is not None
            if self.cache is not None and "cache" in mine:
                self.cache.load_state_dict(mine["cache"])
            self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in mine["positions"].items()}
            self.counters.batches = int(mine["batches"])
            self.ledger = {ids[u]: e for u, e in _ledger_from_state(mine.get("ledger", {})).items() if u in ids}
            self.stream.trained_before = _ledger_from_state(mine.get("trained_before", {}))
            if uncached:
                self._stream_after_cache(mine)
            return
        ledgers = [state["ledger"] for state in states.values() if state.get("ledger") is not None]
        old = next(iter(states.values()), {}).get("layout")
        if not ledgers or len(ledgers) < len(states):  # a rank without one
            log.warning(
                "data layout changed since the checkpoint (%s -> %s) and it has no ledger: the data stream restarts",
                old,
                self.layout,
            )
            return
        merged: dict[str, tuple[int, np.ndarray]] = {}  # the ranks' ledgers hold disjoint shards
        for ledger in ledgers:
            merged.update(_ledger_from_state(ledger))
        mine_now = set(self.rank_urls)
        self.ledger = {ids[u]: e for u, e in merged.items() if u in mine_now}
        self.stream.trained_before = {u: e for u, e in merged.items() if u in mine_now}
        if self.rank == 0:
            log.warning(
                "data layout changed since the checkpoint (%d worker(s) x batch %s -> %d x %d): shards "
                "re-dealt; each pass goes on without the samples it already trained",
                len(states),
                old.get("batch_size") if old else "?",
                self.layout["world_size"],
                self.layout["batch_size"],
            )

    def _stream_after_cache(self, mine: dict) -> None:
        """The checkpoint's run cached and this one streams (its slice does not fit now, or data.cache=off now).
        Before its cache took over, the stream positions are exact; after, they are behind what the cached batches
        trained, so the stream starts over through the ledger, as after a resize: each pass goes on without what
        the ledger says was trained (every sample of the interrupted pass is still trained once)."""
        why = "does not fit now" if self.cache_setting != "off" else "is off now (data.cache=off)"
        if not mine["cache"].get("active"):  # still in the streamed first pass
            log.warning(
                "rank %d: the checkpoint's run cached its data on the device, which %s: streamed every pass; the "
                "passes after the first are in another order than an uninterrupted run's",
                self.rank,
                why,
            )
            return
        self.positions = {}
        self.stream.trained_before = {self.urls[i]: entry for i, entry in self.ledger.items()}
        log.warning(
            "rank %d: the checkpoint's run drew its batches from a device cache, which %s: streamed from the shards, "
            "each pass without what the ledger says was trained; the batch order now differs from an uninterrupted "
            "run's (every sample of the interrupted pass is still trained once)",
            self.rank,
            why,
        )

    def close(self) -> None:
        # Dropping the iterator shuts the loader's worker processes down, unless an error raised through it (e.g.
        # an object store that stopped answering) still holds it in its traceback: then it is told to, since its
        # workers ignore SIGTERM and the process would wait for them forever at exit.
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()


def _quiet_about_dead_loader_processes() -> None:
    """When a loader process dies (killed: out of memory, say), torch's SIGCHLD handler raises RuntimeError
    "DataLoader worker ... is killed by signal" in the training process wherever it is, also inside a __del__
    (a pipe's, the DataLoader iterator's own shutdown), where Python prints it as "Exception ignored in ..." with a
    traceback. The run reports that death in its one line (ImageBatches.__next__, loader_death_as_run_error, or
    the DataLoader's own check of its workers), so those copies are dropped; every other one is printed."""
    if not getattr(sys.unraisablehook, "quiet_about_dead_loader_processes", False):
        sys.unraisablehook = _QuietHook(sys.unraisablehook)


class _QuietHook:
    """sys.unraisablehook without the loader deaths' copies (see _quiet_about_dead_loader_processes)."""

    quiet_about_dead_loader_processes = True

    def __init__(self, previous: Callable[[Any], object]):
        self.previous = previous

    def __call__(self, unraisable: Any) -> None:
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value).startswith("DataLoader worker")):
            self.previous(unraisable)


def loader_death_as_run_error(exc_type, exc, tb) -> bool:
    """An ExitStack exit callback around the training loop: when a loader process dies (killed: out of memory,
    say), torch raises RuntimeError "DataLoader worker (pid N) is killed by signal" in the training process
    wherever it is at that moment; that becomes RunError, one line."""
    if exc_type is RuntimeError and str(exc).startswith("DataLoader worker"):
        reason = str(exc).strip().splitlines()[0][:200]
        raise RunError(
            f"the data loader failed: {reason} (out of memory?); the same command resumes from the newest checkpoint"
        ) from None
    return False


def _ledger_to_state(ledger: dict[str, tuple[int, np.ndarray]]) -> dict[str, list]:
    """{shard path: [pass, number of ordinals, trained bits packed]} (compact: a bit per sample)."""
    return {url: [int(p), len(trained), np.packbits(trained).tobytes()] for url, (p, trained) in ledger.items()}


def _ledger_from_state(state: dict[str, list]) -> dict[str, tuple[int, np.ndarray]]:
    return {
        url: (int(p), np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=n).astype(bool))
        for url, (p, n, bits) in state.items()
    }


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


# Samples of each part's first shard that the start decodes: a data set of the wrong images is refused before
# any run file exists (a fraction of a second for PNG shards).
PROBE_SAMPLES = 256


def check_shards(
    spec: str,
    expect_chw: tuple[int, int, int],
    world_size: int = 1,
    probe: bool = True,
    max_bad_fraction: float = MAX_BAD_FRACTION,
) -> None:
    """Before training: the shards exist and are no unfinished `data synth/convert` output (read_info), there are
    enough for every worker, and each part of the spec holds images of the model's size and channels, as its
    dataset.json says and (probe) as the first PROBE_SAMPLES samples of its first shard show, no more than
    `max_bad_fraction` of them unusable. Raises FileNotFoundError or ValueError with a one-line message."""
    c, h, w = expect_chw
    try:
        split_for_rank(expand_shards(spec), 0, world_size)
    except ImagesNotShards as exc:  # the convert command it prints makes images of the model's size
        raise exc.for_size(h) from None
    read_classes(spec)  # '::'-joined parts labelled differently: refused here, in one line
    for part, info in spec_parts(spec):
        if info is not None and (info.image_size, info.image_size, info.channels) != (h, w, c):
            raise ValueError(
                _shape_advice((info.image_size, info.image_size, info.channels), f"{part} dataset.json", expect_chw)
            )
        if probe:
            _probe(
                expand_shards(part)[0], expect_chw, max_bad_fraction, info is not None, len(info.classes) if info else 0
            )


def _shape_advice(shape: tuple[int, int, int], source: str, expect_chw: tuple[int, int, int]) -> str:
    c, h, w = expect_chw
    return (
        f"the shards hold {shape[0]}x{shape[1]} images with {shape[2]} channel(s) ({source}) but the model is "
        f"{h}x{w} with {c}: set model.image_size={shape[0]} model.channels={shape[2]}, or convert the data with "
        f"--size {h}"
    )


def _probe(
    url: str, expect_chw: tuple[int, int, int], max_bad_fraction: float, has_info: bool, num_classes: int = 0
) -> None:
    """Decode the first PROBE_SAMPLES samples of a shard as training will (with a label below `num_classes`, for a
    labelled set); raise ValueError where the model cannot train on them."""
    c, h, w = expect_chw
    shapes: Counter = Counter()
    read, first_bad, name = 0, None, os.path.basename(url)
    try:
        for sample in itertools.islice(iter_samples([url]), PROBE_SAMPLES):
            read += 1
            try:
                array = decode_sample(sample)
                label = decode_label(sample) if num_classes else 0
                if label is None or label >= num_classes > 0:
                    raise ValueError(
                        f"sample '{sample['__key__']}' has {'no label' if label is None else f'label {label}'}, "
                        f"dataset.json has {num_classes} classes"
                    )
            except ValueError as exc:
                first_bad = first_bad or str(exc)
                continue
            shapes[array.shape] += 1
            if array.shape != (h, w, c):
                first_bad = first_bad or (
                    f"sample '{sample['__key__']}' is {array.shape[0]}x{array.shape[1]} with "
                    f"{array.shape[2]} channel(s)"
                )
    except Exception as exc:  # noqa: BLE001 - whatever the tar reader or the URL's opener raised
        status = re.search(r"exit (\d+)", str(exc)) if url.startswith("pipe:") else None
        reason = (
            f"its command exited with status {status.group(1)}"
            if status
            else (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        )
        if read == 0 and (
            isinstance(exc, tarfile.ReadError) or "bad checksum" in reason or "truncated header" in reason
        ):
            # webdataset passes tarfile's error on as a tuple with the open file in it: say what it means
            raise ValueError(
                f"cannot read the first shard, {url}: it is not a tar file; shards are made by "
                "`python -m dcgan_dist.data convert` or `data synth`"
            ) from None
        if read == 0:
            raise ValueError(f"cannot read the first shard, {url}: {reason}") from None
    if read == 0:
        raise ValueError(f"the first shard, {url}, holds no samples")
    if len(shapes) == 1 and next(iter(shapes)) != (h, w, c):  # all alike, and not the model's: the advice
        said = " (dataset.json says otherwise)" if has_info else ""
        raise ValueError(_shape_advice(next(iter(shapes)), f"{name}{said}", expect_chw))
    unusable = read - shapes[(h, w, c)]
    if unusable > max_bad_fraction * read:
        raise ValueError(
            f"{unusable} of the first {read} samples of {name} are unusable for a {h}x{w} model with "
            f"{c} channel(s), more than data.max_bad_fraction={max_bad_fraction:g}; the first: "
            f"{first_bad}; `python -m dcgan_dist.data inspect` lists the shards' problems"
        )


def dataset_size(spec: str) -> int:
    """Samples in a shard spec as its parts' dataset.json files record them; 0 where any part has none."""
    parts = spec_parts(spec)
    infos = [info for _, info in parts if info is not None]
    return sum(info.num_samples for info in infos) if infos and len(infos) == len(parts) else 0


def check_batch(batch_size: int, world_size: int, num_samples: int) -> None:
    """Before training: a global batch no larger than the data set (when its size is known); the memory batches
    need is memory.check_memory's. Raises ValueError with a one-line message."""
    global_batch = batch_size * world_size
    if num_samples and global_batch > num_samples:
        raise ValueError(
            f"train.batch_size={batch_size} x {world_size} worker(s) is a global batch of {global_batch}, "
            f"larger than the data set ({num_samples} samples): every batch would repeat images; use "
            f"train.batch_size={max(1, num_samples // world_size)} or less"
        )


def resolve_data(data_cfg, model_cfg) -> tuple[str, int]:
    """(shard spec, number of samples or 0 if unknown) for a run. Empty data.shards = the embedded synthetic
    faces at the model's size, generated once into data.cache_dir."""
    spec = data_cfg.shards or str(
        ensure_synthetic(data_cfg.cache_dir, data_cfg.synth_num, model_cfg.image_size, model_cfg.channels)
    )
    return spec, data_cfg.num_samples or dataset_size(spec)
