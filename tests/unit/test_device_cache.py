"""data.cache=device and auto on the CPU (issue 29), in-process on tagged, labelled raw and PNG shards: after the
first pass the batches come from the cache; every sample of each pass is trained once, with its own label; a resume
in the streamed first pass and one in the cached passes continue bit-exactly; a resize rebuilds the cache and
finishes the pass without what the ledger says was trained. auto caches where the slice fits and streams where
not; a resume keeps the checkpoint's decision (streamed stays streamed, cached is cached again), and a cached run
resumed where its slice no longer fits streams each pass on without what the ledger says was trained."""

import logging
from collections import Counter

import numpy as np
import pytest
import torch

from dcgan_dist.config import ConfigError, build_config
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
    passes = [tags(take(batches, NUM // BATCH)) for _ in range(4)]
    assert "cached after the first pass" in capsys.readouterr().out
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
    assert batches.cache is None
    assert Counter(tags(take(batches, 18))) == Counter((i, i % 3) for i in range(NUM) for _ in range(2))
    assert "not cached" in capsys.readouterr().out


ALL = Counter((i, i % 3) for i in range(NUM))  # each sample once, with its label
PASS = NUM // BATCH  # batches a pass (whole: no batch spans two passes here)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def no_room(monkeypatch) -> None:
    monkeypatch.setattr("dcgan_dist.data.loader.free_memory", lambda device: 1000)


def test_auto_caches_where_the_slice_fits_and_streams_where_not(shards, monkeypatch):
    auto = loader(shards, cache="auto")
    assert auto.cache is not None
    assert same(take(auto, 3 * PASS), take(loader(shards, cache="device"), 3 * PASS)) and auto.cache.active
    no_room(monkeypatch)
    auto = loader(shards, cache="auto")
    assert auto.cache is None
    assert same(take(auto, 3 * PASS), take(loader(shards, cache="off"), 3 * PASS))


@pytest.mark.parametrize("setting", ["device", "auto"])
def test_a_resume_keeps_a_streamed_checkpoint_streamed_where_the_slice_fits_now(shards, monkeypatch, setting):
    with monkeypatch.context() as patch:
        no_room(patch)
        whole = take(loader(shards, cache=setting), 3 * PASS)
        first = loader(shards, cache=setting)
        take(first, PASS + 3)
    resumed = loader(shards, cache=setting, state=first.state_dict())  # fits now
    assert resumed.cache is None
    assert same(take(resumed, 2 * PASS - 3), whole[PASS + 3 :])


@pytest.mark.parametrize("setting", ["device", "auto"])
def test_a_resume_keeps_a_cached_checkpoint_cached(shards, setting):
    whole = take(loader(shards, cache=setting), 3 * PASS)
    first = loader(shards, cache=setting)
    take(first, PASS + 3)
    resumed = loader(shards, cache=setting, state=first.state_dict())
    assert same(take(resumed, 2 * PASS - 3), whole[PASS + 3 :]) and resumed.cache.active


@pytest.mark.parametrize("stop", [PASS + 7, 2 * PASS + 2])  # in the first cached pass; in a later one
def test_a_cached_checkpoint_that_does_not_fit_now_streams_each_pass_once(shards, monkeypatch, caplog, stop):
    first = loader(shards, cache="auto")
    before = tags(take(first, stop))
    assert first.cache.active
    no_room(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="dcgan_dist.data"):
        resumed = loader(shards, cache="auto", state=first.state_dict())
    assert resumed.cache is None and [r for r in caplog.records if r.levelno == logging.WARNING]
    done = stop % PASS
    after = tags(take(resumed, PASS - done + PASS))
    interrupted = before[len(before) - done * BATCH :] + after[: (PASS - done) * BATCH]
    assert Counter(interrupted) == ALL  # the interrupted pass: every sample once
    assert Counter(after[(PASS - done) * BATCH :]) == ALL  # then a whole pass
    # ... the streamed run's: the pass after the interrupted one is that of a run that never cached
    assert after[(PASS - done) * BATCH :] == tags(take(loader(shards, cache="off"), (stop // PASS + 2) * PASS))[-NUM:]
    # The streamed run goes on as any streamed one: its own resume is bit-exact and stays streamed.
    again = loader(shards, cache="auto", state=resumed.state_dict())
    assert again.cache is None
    assert same(take(again, PASS), take(resumed, PASS))


def test_a_cached_checkpoint_in_its_streamed_first_pass_that_does_not_fit_now_streams_on_exactly(shards, monkeypatch):
    first = loader(shards)
    take(first, 5)
    no_room(monkeypatch)
    resumed = loader(shards, state=first.state_dict())
    assert resumed.cache is None
    assert same(take(resumed, 2 * PASS - 5), take(loader(shards, cache="off"), 2 * PASS)[5:])


def test_a_changed_setting_is_a_new_decision(shards):
    first = loader(shards, cache="off")
    take(first, PASS + 3)
    resumed = loader(shards, cache="auto", state=first.state_dict())
    assert resumed.cache is not None  # off -> auto: cached from the next pass on
    got = tags(take(resumed, 2 * PASS - 3))  # the rest of pass 1 streamed, pass 2 mostly cached
    assert Counter(got[-NUM:]) == ALL and resumed.cache.active
    back = loader(shards, cache="off", state=resumed.state_dict())  # auto -> off: streamed, each pass once
    assert back.cache is None and Counter(tags(take(back, PASS))) == ALL


def test_a_checkpoint_from_before_the_decision_was_recorded_is_read_by_what_it_did(shards):
    """No cache_setting in the state (older checkpoints): one with a cache entry was device, one without was off;
    so off -> device caches (a new decision), and device -> device is rebuilt bit-exactly."""
    streamed = loader(shards, cache="off")
    take(streamed, PASS + 3)
    state = streamed.state_dict()
    del state["cache_setting"]
    assert loader(shards, cache="device", state=state).cache is not None
    whole = take(loader(shards), 3 * PASS)
    cached = loader(shards)
    take(cached, PASS + 3)
    state = cached.state_dict()
    del state["cache_setting"]
    resumed = loader(shards, state=state)
    assert same(take(resumed, 2 * PASS - 3), whole[PASS + 3 :]) and resumed.cache.active


@pytest.mark.parametrize("value", ["on", "gpu", "true", "1"])
def test_a_data_cache_value_other_than_off_device_or_auto_is_a_config_error(value):
    assert build_config("debug", ["data.cache=auto"]).data.cache == "auto"
    assert build_config("debug", ["data.cache=false"]).data.cache == "off"
    with pytest.raises(ConfigError):
        build_config("debug", [f"data.cache={value}"])
