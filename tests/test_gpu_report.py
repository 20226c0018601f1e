"""`bench --gpu-report` on CPU with a tiny model: every section is there, the rows that apply ran, the ones
that do not say why (no timing assertions)."""

import json
import math
import re

from .conftest import TINY, run_cli

ROWS = [
    "minimal loop (PyTorch example), fp32",
    "our step, fp32",
    "our step, fp32 + fused Adam",
    "our step, bf16 + channels_last",
    "+ torch.compile",
    "+ CUDA graphs (compile mode reduce-overhead)",
]


def test_gpu_report_on_cpu(tmp_path, tiny_shards):
    out = tmp_path / "docs" / "gpu-report.md"
    proc = run_cli(
        "-m",
        "dcgan_dist.bench",
        "--gpu-report",
        str(out),
        "--config",
        "debug",
        *(a for a in TINY if not a.startswith("wandb.")),  # bench logs nothing to W&B
        f"data.shards={tiny_shards}",
        "bench.steps=2",
        "bench.warmup=1",
        "bench.report_swd_steps=4",
        "eval.num=16",
        "eval.nhoods_per_image=4",
        "bench.report_feed_images=256",
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    text = out.read_text()
    for heading in (
        "## Machine",
        "## Training step",
        "## Loader",
        "## Synchronised batch norm",
        "## Synchronised batch norm: cost of global, node and off",
        "## Quality",
        "## Feeding the step",
        "## Skipped or failed",
    ):
        assert heading in text, heading
    assert f"| torch | {result['machine']['torch']} |" in text and "| cuda | none (CPU build) |" in text

    steps = {row["name"]: row for row in result["steps"]}
    assert list(steps)[: len(ROWS)] == ROWS
    assert not [r for r in steps.values() if r["note"].startswith("failed")], result["steps"]
    for name in ROWS[:4]:  # what runs on a CPU ran, with a ratio to the minimal loop and an MFU
        assert steps[name]["images_per_s"] > 0 and steps[name]["vs_minimal"] > 0 and steps[name]["mfu"] > 0, name
        assert re.search(rf"\| {re.escape(name)} \| [0-9.]+ \| [0-9.]+ \| [0-9.e+-]+ % \|", text), name
    assert steps[ROWS[0]]["vs_minimal"] == 1.0
    assert steps[ROWS[4]]["images_per_s"] is None and "bench.report_compile=true" in steps[ROWS[4]]["note"]
    assert steps[ROWS[5]]["note"] == "skipped: CUDA graphs need a CUDA device"
    for name in ROWS[4:]:  # listed again, with the reason, under "Skipped or failed"
        assert f"- {name}: skipped: " in text.split("## Skipped or failed", 1)[1]
    real_loader = result["steps"][len(ROWS)]
    assert "real loader" in real_loader["name"] and real_loader["images_per_s"] > 0

    assert result["loader"]["images_per_s"] > 0
    assert "backend" in result["sync_bn"], result["sync_bn"]  # else the check raised: its note says what
    assert result["sync_bn"]["backend"] == "gloo" and result["sync_bn"]["passed"] is True
    assert result["sync_bn"]["largest_difference"] < 1e-9 and "**passed**" in text
    cost = result["sync_bn_cost"]
    assert "step_ms" in cost, cost  # else its note says why
    assert list(cost["step_ms"]) == ["global", "node", "off"] and all(v > 0 for v in cost["step_ms"].values())
    assert re.search(r"\| node \| [0-9.]+ \| [0-9.]+ \|", text)
    assert result["swd"]["fp32"] > 0 and result["swd"]["bf16"] > 0 and result["swd"]["steps"] == 4
    assert re.search(r"\| fp32 \| [0-9.]+ \| [0-9.]+ s \|", text) and re.search(
        r"\| bf16 \| [0-9.]+ \| [0-9.]+ s \|", text
    )

    feed = result["feeding"]  # the fastest step that ran, fed from PNG, raw and the device cache
    fastest = max((r for r in result["steps"][: len(ROWS)] if r["images_per_s"]), key=lambda r: r["images_per_s"])
    assert feed["step"] == fastest["name"] and feed["images"] == 256
    for fmt in ("png", "raw"):
        row = feed[fmt]
        assert row["images_per_s"] > 0 and row["per_cpu_s"] > 0, row
        assert row["processes_needed"] == math.ceil(fastest["images_per_s"] / row["per_cpu_s"])
    assert feed["raw"]["per_cpu_s"] > feed["png"]["per_cpu_s"]  # no decoding: even tiny images load faster raw
    cache = feed["cache"]
    assert cache["images_per_s"] > 0 and cache["step_images_per_s"] > 0 and cache["step_vs_alone"] > 0, cache
    assert re.search(r"\| raw shards \| [0-9]+ \| [0-9]+ \| [0-9]+ \|", text)
