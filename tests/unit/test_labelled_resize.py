"""Elastic resize of a labelled run, at the loader (issue 26): two ranks train a few batches of labelled shards, then
three ranks take over from both their saved states (`load_rank_states`, what an elastic restart's checkpoint
restore calls) and finish the pass: every sample of the pass is trained exactly once, each with its own label, and
the pass's per-class counts are dataset.json's. In-process on real tar shards, no loader processes."""

import numpy as np
import pytest
import torch

from dcgan_dist.data import ImageBatches, ShardWriter, read_info
from dcgan_dist.data.shards import read_classes

CLASSES = ["zero", "one", "two"]
NUM, PER_SHARD, BATCH, SIZE = 36, 6, 4, 8  # 6 shards: 3 ranks get 2 each, 2 ranks 3 each


def label_of(index: int) -> int:
    return (index * 7 + index // 5) % len(CLASSES)  # not the shard layout's pattern


@pytest.fixture(scope="module", params=["png", "raw"])  # raw: the chunk path (loader._chunk_batches)
def shards(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("labelled-resize") / "tagged"
    rng = np.random.default_rng(0)
    with ShardWriter(out, shard_size=PER_SHARD, classes=CLASSES, fmt=request.param, raw_chunk=4) as writer:
        for i in range(NUM):
            image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            image[0, 0, 0] = i  # its tag
            writer.write(image, label=label_of(i))
        writer.close()
    return out


def loader(shards, rank: int, world_size: int, states=None) -> ImageBatches:
    batches = ImageBatches(
        str(shards), BATCH, rank=rank, world_size=world_size, seed=3, shuffle_buffer=8, expect_chw=(3, SIZE, SIZE)
    )
    if states is not None:
        batches.load_rank_states(states)
    return batches


def take(batches: ImageBatches, n: int) -> list[tuple[int, int]]:
    """(tag, label) of each sample of the next n batches, in order."""
    got = []
    for _ in range(n):
        images, labels = next(batches)
        assert labels is not None and labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        got += [(int(image[0, 0, 0]), int(label)) for image, label in zip(images, labels)]
    return got


def test_a_labelled_run_resized_from_2_to_3_ranks_trains_each_sample_of_the_pass_once(shards):
    assert read_classes(str(shards)) == CLASSES
    info = read_info(str(shards))
    assert info is not None and info.class_counts == {
        name: sum(label_of(i) == k for i in range(NUM)) for k, name in enumerate(CLASSES)
    }

    two = [loader(shards, rank, 2) for rank in range(2)]
    before = [sample for batches in two for sample in take(batches, 2)]  # 2 ranks x 2 batches x 4
    states = {rank: batches.state_dict() for rank, batches in enumerate(two)}
    assert len({tag for tag, _ in before}) == len(before) == 16

    trained = set(tag for tag, _ in before)
    finished = list(before)
    shard_of = [i // PER_SHARD for i in range(NUM)]
    for rank in range(3):
        batches = loader(shards, rank, 3, states)
        mine = {i for i in range(NUM) if shard_of[i] % 3 == rank}  # shards re-dealt round-robin to 3 ranks
        left = mine - trained
        got = take(batches, -(-len(left) // BATCH) + 1)  # the rest of the pass, then the next one begins
        assert {tag for tag, _ in got} <= mine, f"rank {rank} read another rank's shards"
        assert sorted(tag for tag, _ in got[: len(left)]) == sorted(left), f"rank {rank}: not the rest of the pass"
        finished += got[: len(left)]
        batches.close()
    for batches in two:
        batches.close()

    # Every sample of the pass once, each with its own label; the pass's classes counted as dataset.json does.
    assert sorted(tag for tag, _ in finished) == list(range(NUM))
    assert all(label == label_of(tag) for tag, label in finished)
    counts = {name: sum(label == k for _, label in finished) for k, name in enumerate(CLASSES)}
    assert counts == info.class_counts
