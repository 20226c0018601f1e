"""The loader's bookkeeping, in-process on 16 tiny labelled images in 4 shards (no loader processes): the per-rank
slice, slot seeds, the per-shard counts of dataset.json, positions for an exact resume and the ledger for a resize.
Samples are counted as (image, label) pairs: a label that left its image would show."""

import pytest
import torch

from dcgan_dist.data import ImageBatches, write_synthetic_shards
from dcgan_dist.data.loader import slot_seed, split_for_rank
from dcgan_dist.data.shards import decode_label, decode_sample, expand_shards, iter_samples, read_info, shard_counts

NUM, PER_SHARD, BATCH = 16, 4, 4


@pytest.fixture(scope="module", params=["png", "raw"])  # raw: the chunk path (loader._chunk_batches)
def shards(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("ledger") / "faces"
    write_synthetic_shards(
        out, NUM, shard_size=PER_SHARD, size=32, seed=5, processes=1, progress=False, labels="skin", fmt=request.param
    )
    return out


@pytest.fixture(scope="module")
def truth(shards) -> dict[bytes, int]:
    """Each image of the set (its bytes, channels last) -> its label, as the shards hold them."""
    samples = list(iter_samples(expand_shards(str(shards))))
    pairs = {decode_sample(s).tobytes(): decode_label(s) for s in samples}
    assert len(pairs) == NUM and len(set(pairs.values())) > 1  # distinct images, more than one class
    return pairs


def batches(shards, rank=0, world_size=1, state=None, states=None) -> ImageBatches:
    loader = ImageBatches(
        str(shards), BATCH, rank=rank, world_size=world_size, seed=1, shuffle_buffer=8, expect_chw=(3, 32, 32)
    )
    if state is not None:
        loader.load_state_dict(state)
    if states is not None:
        loader.load_rank_states(states)
    return loader


def take(loader: ImageBatches, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n batches of (images, labels)."""
    got = []
    for _ in range(n):
        images, labels = next(loader)
        assert labels is not None and labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        got.append((images.clone(), labels.clone()))
    return got


def image_keys(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[bytes, int]]:
    """(image bytes, label) of every sample, in order; the images' bytes channels last, as the shards hold them."""
    return [
        (img.permute(1, 2, 0).contiguous().numpy().tobytes(), int(label))
        for images, labels in batches
        for img, label in zip(images, labels)
    ]


def assert_true_labels(pairs: list[tuple[bytes, int]], truth: dict[bytes, int]) -> None:
    assert all(truth[image] == label for image, label in pairs)


def test_slot_seed_is_stable_and_distinct():
    assert slot_seed(0, 0, 0, 0) == slot_seed(0, 0, 0, 0) == 7896617691693857887  # the same in every run/version
    seeds = {
        slot_seed(seed, rank, slot, p) for seed in (0, 1) for rank in range(3) for slot in range(2) for p in range(3)
    }
    assert len(seeds) == 2 * 3 * 2 * 3 and all(0 <= s < 2**63 for s in seeds)
    assert slot_seed(1, 0) != slot_seed(0, 1)  # the order of the parts matters


@pytest.mark.parametrize("num_shards, world_size", [(8, 2), (7, 3), (3, 3)])
def test_split_for_rank_deals_every_shard_once(num_shards, world_size):
    urls = [f"s{i:02d}.tar" for i in range(num_shards)]
    parts = [split_for_rank(urls, r, world_size) for r in range(world_size)]
    assert sorted(u for part in parts for u in part) == urls
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert parts[0][0] == urls[0] and (world_size == 1 or parts[1][0] == urls[1])  # dealt round-robin


def test_more_ranks_than_shards_is_refused():
    with pytest.raises(ValueError, match="2 shard.*3 workers"):
        split_for_rank(["a.tar", "b.tar"], 0, 3)


def test_shard_counts_from_dataset_json(shards):
    counts, missing = shard_counts(str(shards))
    assert counts == {f"{shards}/{p.name}": PER_SHARD for p in sorted(shards.glob("*.tar"))} and len(counts) == 4
    assert missing == []
    first = sorted(shards.glob("*.tar"))[0]
    moved = first.with_suffix(".moved")
    first.rename(moved)
    try:
        assert shard_counts(str(shards))[1] == [f"{shards}/{first.name}"]
    finally:
        moved.rename(first)


def test_a_pass_trains_each_sample_of_the_rank_once(shards, truth):
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    for rank in range(2):
        loader = batches(shards, rank=rank, world_size=2)
        assert loader.stream.raw_chunks == (read_info(str(shards)).format == "raw")  # raw: batched from chunks
        assert loader.rank_urls == urls[rank::2]
        first_pass = take(loader, 2)  # 2 shards x 4 samples = one pass of this rank
        assert len(set(image_keys(first_pass))) == 8
        assert_true_labels(image_keys(first_pass), truth)
        mine = {urls.index(u) for u in urls[rank::2]}
        assert set(loader.ledger) == mine
        assert all(p == 0 and t.tolist() == [True] * PER_SHARD for p, t in loader.ledger.values())
        assert loader.counters.batches == 2
        second_pass = take(loader, 2)  # the next pass: the same samples in another order
        assert sorted(image_keys(second_pass)) == sorted(image_keys(first_pass))
        assert image_keys(second_pass) != image_keys(first_pass)
        assert all(p == 1 for p, _ in loader.ledger.values())
        loader.close()


def test_a_resume_with_the_same_layout_continues_exactly(shards, truth):
    whole = batches(shards)
    expected = take(whole, 7)  # across a pass boundary (4 batches a pass)
    first = batches(shards)
    take(first, 3)
    state = first.state_dict()
    resumed = batches(shards, state=state)
    got = take(resumed, 4)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, expected[3:]))
    assert_true_labels(image_keys(got), truth)
    for loader in (whole, first, resumed):
        loader.close()


def test_a_resize_finishes_the_pass_without_the_samples_the_ledger_has(shards, truth):
    """Two ranks train one batch each (8 of 16 samples), then one rank resumes from both their states: the rest
    of the pass is the 8 samples not trained yet, each once, with its label; then a new pass of all 16."""
    ranks = [batches(shards, rank=r, world_size=2) for r in range(2)]
    trained = image_keys([b for loader in ranks for b in take(loader, 1)])
    states = {r: loader.state_dict() for r, loader in enumerate(ranks)}
    single = batches(shards, rank=0, world_size=1, states=states)
    assert sum(int(t.sum()) for _, t in single.stream.trained_before.values()) == 8
    rest = image_keys(take(single, 2))
    assert len(set(rest)) == 8 and not set(rest) & set(trained)
    assert all(t.all() for p, t in single.ledger.values() if p == 0) and len(single.ledger) == 4
    next_pass = image_keys(take(single, 4))
    assert sorted(next_pass) == sorted(trained + rest) == sorted(truth.items())
    assert_true_labels(trained + rest + next_pass, truth)
    for loader in (*ranks, single):
        loader.close()
