"""data.cache=device through training (issue 29): a run interrupted in its cached passes and resumed ends with the
weights of the uninterrupted run, bit for bit (the cache is rebuilt at the resume and the same batches follow); a
run that cached, resumed where it streams, finishes the interrupted pass through its checkpoint's ledger."""

import numpy as np
import torch

from .conftest import TINY, run_cli


def test_a_resumed_cached_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_shards, tmp_path):
    # 512 images, batch 16: 32 steps a pass; step 40 is in the first cached pass
    common = ["--config", "debug", *TINY, f"data.shards={tiny_shards}", "data.cache=device"]
    whole = run_cli("-m", "dcgan_dist.train", *common, "train.max_steps=48", f"run.dir={tmp_path / 'a'}")
    assert whole.returncode == 0, whole.stderr[-2000:]
    assert "cached after the first pass" in whole.stdout + whole.stderr
    for steps in (40, 48):
        part = run_cli("-m", "dcgan_dist.train", *common, f"train.max_steps={steps}", f"run.dir={tmp_path / 'b'}")
        assert part.returncode == 0, part.stderr[-2000:]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "step_0000048.pt", weights_only=False) for d in "ab")
    assert all(torch.equal(a[net][k], b[net][k]) for net in ("G", "D") for k in a[net])


def test_a_cached_run_resumed_without_its_cache_trains_the_rest_of_the_pass_once(tiny_shards, tmp_path):
    # auto caches from step 33 (pass 1); resumed at 40 with data.cache=off, the stream finishes pass 1 through the
    # ledger: at step 48, 256 distinct samples of pass 1 trained (a stream restarted at its old position would
    # train some of the cached steps' samples again, fewer distinct ones)
    common = ["--config", "debug", *TINY, f"data.shards={tiny_shards}", f"run.dir={tmp_path}"]
    for steps, cache in ((40, "auto"), (48, "off")):
        run = run_cli("-m", "dcgan_dist.train", *common, f"train.max_steps={steps}", f"data.cache={cache}")
        assert run.returncode == 0, run.stderr[-2000:]
    state = torch.load(tmp_path / "checkpoints" / "step_0000048.pt", weights_only=False)["ranks"][0]["data"]
    assert "cache" not in state and state["cache_setting"] == "off"
    trained = [np.unpackbits(np.frombuffer(bits, np.uint8))[:n] for p, n, bits in state["ledger"].values() if p == 1]
    assert sum(int(t.sum()) for t in trained) == 48 * 16 - 512
