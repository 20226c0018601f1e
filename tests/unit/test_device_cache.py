"""data.cache=device on the CPU (issue 29), in-process on tagged, labelled raw and PNG shards: after the first
pass the batches come from the cache; every sample of each pass is trained once, with its own label; a resume
in the streamed first pass and one in the cached passes continue bit-exactly; a resize rebuilds the cache and
finishes the pass without what the ledger says was trained."""

from collections import Counter

import numpy as np
import pytest
import torch

from dcgan_dist.data import ImageBatches, ShardWriter

NUM, PER_SHARD, BATCH, SIZE = 36, 9, 4, 8  # 4 shards, 9 batches a pass
CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module", params=["raw", "png"])
def shards(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("cache") / "tagged"
    rng = np.random.default_rng(0)
    with ShardWriter(out, shard_size=PER_SHARD, classes=CLASSES, fmt=request.param, raw_chunk=4) as writer:
        for i in range(NUM):
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            image[0, 0, 0] = i  # its tag
            writer.write(image, label=i % 3)
        writer.close()
    return out


def loader(shards, cache="device", rank=0, world_size=1, state=None, states=None) -> ImageBatches:
    batches = ImageBatches(
        str(shards),
        BATCH,
        rank=rank,
        world_size=world_size,
        seed=4,
        shuffle_buffer=8,
        expect_chw=(3, SIZE, SIZE),
        cache=cache,
    )
    if state is not None:
        batches.load_state_dict(state)
    if states is not None:
        batches.load_rank_states(states)
    return batches


def take(batches: ImageBatches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    got = []
    for _ in range(n):
        images, labels = next(batches)
        got.append((images.clone(), labels.clone()))
    return got


def tags(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[int, int]]:
    return [(int(img[0, 0, 0]), int(label)) for images, labels in batches for img, label in zip(images, labels)]


def test_each_pass_trains_every_sample_once_and_later_passes_come_from_the_cache(shards, capsys):
    batches = loader(shards)
    assert "cached after the first pass" in capsys.readouterr().out
    passes = [tags(take(batches, NUM // BATCH)) for _ in range(4)]
    assert batches.cache is not None and batches.cache.active and batches.cache.drawn > 0
    for got in passes:
        assert Counter(got) == Counter((i, i % 3) for i in range(NUM))  # each sample once, with its label
    assert passes[2] != passes[3]  # another order each pass
    assert batches.counters.batches == 4 * NUM // BATCH
    assert all(p == 3 and t.all() for p, t in batches.ledger.values())  # cached batches reach the ledger


@pytest.mark.parametrize("stop", [5, 16])  # in the streamed first pass; in the cached passes
def test_a_resume_with_the_cache_is_bit_exact(shards, stop):
    whole = take(loader(shards), 30)
    first = loader(shards)
    take(first, stop)
    resumed = loader(shards, state=first.state_dict())
    got = take(resumed, 30 - stop)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, whole[stop:]))
    assert resumed.cache.active


def test_the_cache_equals_the_uncached_stream_in_its_first_pass(shards):
    cached, plain = take(loader(shards), 9), take(loader(shards, cache="off"), 9)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(cached, plain))


def test_a_resize_drops_the_cache_and_finishes_the_pass_once(shards):
    two = [loader(shards, rank=r, world_size=2) for r in range(2)]
    for b in two:
        take(b, 6)  # 18 samples a rank: its first pass, then 6 of the second, the last 4 from its cache
        assert b.cache.active
    states = {r: b.state_dict() for r, b in enumerate(two)}
    # tag = shard * PER_SHARD + ordinal: what the ledgers say the second pass (1) trained
    trained = {s * PER_SHARD + o for b in two for s, (p, t) in b.ledger.items() if p == 1 for o in np.flatnonzero(t)}
    assert len(trained) == 12
    one = loader(shards, rank=0, world_size=1, states=states)
    rest = tags(take(one, (NUM - 12) // BATCH))
    assert Counter(rest) == Counter((i, i % 3) for i in range(NUM) if i not in trained)  # the pass finished once
    assert Counter(tags(take(one, NUM // BATCH))) == Counter((i, i % 3) for i in range(NUM))  # then a whole one
    assert one.cache.active and one.cache.start_pass == 2


def test_a_slice_that_does_not_fit_is_streamed_and_the_decision_printed(shards, monkeypatch, capsys):
    monkeypatch.setattr("dcgan_dist.data.loader.free_memory", lambda device: 1000)
    batches = loader(shards)
    assert batches.cache is None and "not cached" in capsys.readouterr().out
    assert Counter(tags(take(batches, 18))) == Counter((i, i % 3) for i in range(NUM) for _ in range(2))
