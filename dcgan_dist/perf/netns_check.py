"""The step-time model's latency and bandwidth terms, measured between two network namespaces (as root).

    sudo python -m dcgan_dist.perf.netns_check [--rates none,1gbit,100mbit] [--width 32] [--out FILE.json]

brings up cluster/netns-testbed.sh's hosts (head 198.18.0.3, worker 198.18.0.4, joined by veth pairs and a
bridge), limits each host's link with `tc qdisc ... tbf` (rate limiting: this kernel has no netem delay) and
runs plain torch.distributed gloo processes in them (no Ray), for each rate:

  latency     a one-number all-reduce, and a BN-sized all-gather, between the two hosts (2 and 4 ranks)
  bandwidth   a 16 MB all-reduce (2 and 4 ranks; a ring of 2 sends all of it each way)
  replay      the collectives one training step makes (counted by perf/collectives.py, DCGAN-64 at
              ngf = ndf = --width) for dist.sync_bn global, node and off, 4 ranks, 2 per host, one after another
  step        real train_step calls with 2 ranks (one per host), global and off

and compares the measurements with the model's prediction: collectives x latency + wire bytes / rate. Prints
one JSON object (also written to --out) and a table. Takes a few minutes on 2 vCPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from dcgan_dist.perf.collectives import StepSpec, count

ROOT = Path(__file__).resolve().parents[2]
TESTBED = ROOT / "cluster" / "netns-testbed.sh"
HEAD, WORKER = "198.18.0.3", "198.18.0.4"


def available() -> str:
    """'' when this process can make namespaces and limit links, else why not (one line)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc)"
    for tool in ("ip", "tc"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            return f"needs the '{tool}' command (iproute2)"
    if not TESTBED.is_file():
        return f"needs {TESTBED}"
    return ""


def rate_bits(rate: str) -> float:
    """'100mbit' -> 1e8 bits/s; 'none' -> inf."""
    if rate == "none":
        return float("inf")
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise ValueError(f"rate {rate!r}: give e.g. 100mbit, 1gbit or none")


def limit(prefix: str, rate: str) -> None:
    for host in ("head", "worker"):
        ns = f"{prefix}-{host}"
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
        if rate != "none":
            burst = max(32_000, int(rate_bits(rate) / 8 * 0.002))  # 2 ms of the rate (tbf needs >= rate / HZ)
            cmd = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", str(burst)]
            subprocess.run(["ip", "netns", "exec", ns, *cmd, "latency", "100ms"], check=True)


def run_ranks(prefix: str, world: int, per_host: int, tasks: str, out: Path, args, port: int) -> dict:
    """`world` gloo ranks, the first `per_host` on head, the rest on worker; rank 0's JSON."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in range(world):
        ns = f"{prefix}-{'head' if rank < per_host else 'worker'}"
        cmd = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "dcgan_dist.perf.collectives", "worker",
            "--rank", str(rank), "--world-size", str(world), "--ranks-per-node", str(per_host),
            "--addr", HEAD, "--port", str(port), "--tasks", tasks, "--out", str(out),
            "--width", str(args.width), "--batch", str(args.batch), "--reps", str(args.reps),
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for p in procs:
            output, _ = p.communicate(timeout=args.timeout)
            if p.returncode:
                raise RuntimeError(f"a timing rank exited {p.returncode}: {output.strip()[-2000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return json.loads(out.read_text())


def wire_bytes(summary: dict, world: int, per_host: int) -> float:
    """Bytes one host sends to the other per step (ring algorithms; ranks placed host by host): an all-reduce
    over n ranks sends 2(n-1)/n of its payload along each ring link, an all-gather (n-1)/n of its output; a
    ring over two hosts crosses between them once each way. Groups inside one host send nothing across."""
    total = 0.0
    for kind, k in summary["per_step"].items():
        n = max(k["group_sizes"])
        if n <= per_host and kind != "ddp_bucket" and world > per_host and n < world:
            continue  # a node group: inside one host
        if kind in ("all_gather", "all_gather_into_tensor"):
            total += k["bytes"] * (n - 1)  # payload is this rank's part: the output is n parts
        else:
            total += k["bytes"] * 2 * (n - 1) / n
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.perf.netns_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="none,1gbit,100mbit")
    parser.add_argument("--width", type=int, default=32, help="ngf = ndf of the DCGAN-64 that is counted and run")
    parser.add_argument("--batch", type=int, default=8, help="per rank, for the step timings")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    why = available()
    if why:
        print(f"error: the network-namespace check {why}; run it as root on Linux", file=sys.stderr)
        return 2
    prefix = f"sb{random.randrange(10_000, 99_999)}"
    result: dict = {"width": args.width, "batch": args.batch, "rates": {}}
    with tempfile.TemporaryDirectory() as tmp:
        counts = {}
        for mode in ("global", "node", "off"):
            counts[mode] = count(StepSpec(mode=mode, world_size=4, ranks_per_node=2, width=args.width, batch=2))
            Path(tmp, f"{mode}.json").write_text(json.dumps(counts[mode]))
        counts2 = {m: count(StepSpec(mode=m, world_size=2, ranks_per_node=1, width=args.width)) for m in ("global",)}
        result["counts"] = {m: c["summary"] for m, c in counts.items()}
        subprocess.run(["bash", str(TESTBED), "up", prefix], check=True, capture_output=True)
        try:
            port = 29600
            for rate in args.rates.split(","):
                limit(prefix, rate)
                port += 1
                two = run_ranks(prefix, 2, 1, "latency,bandwidth,step:global,step:off", Path(tmp, "2.json"), args, port)
                port += 1
                replays = ",".join(f"replay:{m}={Path(tmp, m + '.json')}" for m in counts)
                four = run_ranks(prefix, 4, 2, "latency,bandwidth," + replays, Path(tmp, "4.json"), args, port)
                four = {(k if k.startswith("replay") else f"four_{k}"): v for k, v in four.items()}
                result["rates"][rate] = {**two, **four}
                print(json.dumps({"rate": rate, **two, **four}), flush=True)
        finally:
            subprocess.run(["bash", str(TESTBED), "down", prefix], capture_output=True)
    result["model"] = model_check(result, counts2["global"]["summary"])
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    print("\n".join(check_table(result)))
    return 0


def model_check(result: dict, two_rank_global: dict) -> dict:
    """Per rate, predicted and measured seconds:
    - bandwidth: a 16 MB all-reduce between 2 ranks (one per host) = latency + 16 MB / the nominal tbf rate
      (a ring of two sends all of it each way);
    - replay_<mode>: the step's collectives over 4 ranks (2 per host) = each collective x its kind's 4-rank
      latency + the DDP bytes x the 4-rank 16 MB all-reduce's seconds per byte (gloo's
      algorithm decides how many times a byte crosses: this calibrates it once per rate, and the check is that
      a step's differently sized collectives add up to it);
    - step_global: 2 ranks = the unlimited link's step + the step's wire bytes / the nominal rate."""
    rates = result["rates"]
    base = rates.get("none") or next(iter(rates.values()))
    out = {}
    for rate, r in rates.items():
        bits = rate_bits(rate)
        row = {
            "latency_all_reduce_s": r["latency_all_reduce_s"],
            "four_latency_all_reduce_s": r["four_latency_all_reduce_s"],
        }
        row["bandwidth_predicted_s"] = r["latency_all_reduce_s"] + r["bandwidth_bytes"] * 8 / bits
        row["bandwidth_measured_s"] = r["bandwidth_all_reduce_s"]
        row["bandwidth_measured_bits_per_s"] = r["bandwidth_bytes"] * 8 / r["bandwidth_all_reduce_s"]
        per_byte = r["four_bandwidth_all_reduce_s"] / r["four_bandwidth_bytes"]
        row["four_crossings_per_byte"] = per_byte * bits / 8 if bits != float("inf") else None
        for mode, summary in result["counts"].items():
            # Each collective at its kind's measured latency; the BN collectives too in node mode, inside a host:
            # on the test bed a host's loopback is no faster than the veth link (no netem delay on either).
            kinds = summary["per_step"]
            latency = sum(
                k["calls"] * r[f"four_latency_{'bn_all_gather' if kind == 'all_gather' else 'all_reduce'}_s"]
                for kind, k in kinds.items()
            )
            row[f"replay_{mode}_predicted_s"] = latency + kinds["ddp_bucket"]["bytes"] * per_byte
            row[f"replay_{mode}_measured_s"] = r[f"replay_{mode}_s"]
        wire2 = wire_bytes(two_rank_global, 2, 1)
        for mode in ("global", "off"):
            row[f"step_{mode}_measured_s"] = r[f"step_{mode}_s"]
        row["step_global_predicted_s"] = base["step_global_s"] + wire2 * 8 / bits
        out[rate] = row
    return out


def check_table(result: dict) -> list[str]:
    lines = [
        "| link | all-reduce latency, 2 / 4 ranks | 16 MB all-reduce, 2 ranks: model / measured | replay global, 4 "
        "ranks: model / measured | replay node | replay off | step global, 2 ranks: model / measured |",
        "|---|---|---|---|---|---|---|",
    ]

    def ms(x: float) -> str:
        return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"

    for rate, r in result["model"].items():
        replays = [
            f"{ms(r[f'replay_{m}_predicted_s'])} / {ms(r[f'replay_{m}_measured_s'])}" for m in ("global", "node", "off")
        ]
        lines.append(
            f"| {rate} | {r['latency_all_reduce_s'] * 1e6:.0f} / {r['four_latency_all_reduce_s'] * 1e6:.0f} us | "
            f"{ms(r['bandwidth_predicted_s'])} / {ms(r['bandwidth_measured_s'])} | {' | '.join(replays)} | "
            f"{ms(r['step_global_predicted_s'])} / {ms(r['step_global_measured_s'])} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
