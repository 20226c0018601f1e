"""What one training step sends between ranks, per dist.sync_bn mode: collectives counted, bytes summed, and
(on a test bed) timed.

    python -m dcgan_dist.perf.collectives count [--world-size 4] [--ranks-per-node 2] [--modes global,node,off]
                                                [--image-size 64] [--width 64] [--batch 4]

runs real gloo workers on this machine through a few train_step calls (the DCGAN of model.image_size with
ngf = ndf = --width) and prints, per mode, the collectives of one step (after two warm-up steps, when DDP
has rebuilt its buckets) with their payload bytes per rank, as JSON lines and a markdown table.

torch.distributed has no hook API for collectives: `CollectiveCounter` replaces the module's functions
(all_reduce, all_gather, all_gather_into_tensor, broadcast, ...) for the block, which is what the project's
CrossProcessBatchNorm and torch's SyncBatchNorm call, and counts DDP's gradient all-reduce with a comm hook
(one call per bucket; DDP itself calls the C++ process group directly). The payload is the tensor each rank
contributes: an all-reduce's whole tensor, an all-gather's own part.

`worker` (used by perf/netns_check.py) times collectives and steps between processes on other hosts:
latency (a one-number all-reduce), bandwidth (a large all-reduce), the replay of a counted step's
collectives, and real training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dcgan_dist.config import ModelSection, OptimSection
from dcgan_dist.distributed.ddp import wrap_models
from dcgan_dist.distributed.env import DistEnv
from dcgan_dist.gan.models import build_models
from dcgan_dist.gan.step import make_optimizers, train_step

WRAPPED = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "barrier")


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return 0


@dataclass
class Call:
    kind: str  # all_reduce, all_gather, ..., or ddp_bucket (DDP's gradient all-reduce of one bucket)
    numel: int  # elements each rank contributes
    nbytes: int
    group_size: int


class CollectiveCounter:
    """Records every collective called through torch.distributed inside `with counter.counting():`, in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.active = False
        self._lock = threading.Lock()  # DDP's hook runs on autograd's thread

    def record(self, kind: str, tensor, group) -> None:
        if not self.active:
            return
        size = dist.get_world_size(group) if group is not None else dist.get_world_size()
        with self._lock:
            self.calls.append(
                Call(kind, tensor.numel() if isinstance(tensor, torch.Tensor) else 0, _nbytes(tensor), size)
            )

    @contextmanager
    def counting(self):
        originals = {name: getattr(dist, name) for name in WRAPPED}

        def wrap(name, fn):
            def counted(*args, **kwargs):
                tensor = kwargs.get("tensor", kwargs.get("input_tensor"))
                if tensor is None and args:
                    # all_gather(tensor_list, tensor, group), all_gather_into_tensor(out, in, group), others (t, ...)
                    tensor = args[1] if name in ("all_gather", "all_gather_into_tensor") else args[0]
                    if name == "barrier":
                        tensor = None
                group = kwargs.get("group")
                pos = 0 if name == "barrier" else 2  # (tensor[s], op/src/tensor, group, ...) or barrier(group)
                if group is None and len(args) > pos:
                    group = args[pos]
                self.record(name, tensor, group)
                return fn(*args, **kwargs)

            return counted

        for name, fn in originals.items():
            setattr(dist, name, wrap(name, fn))
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            for name, fn in originals.items():
                setattr(dist, name, fn)

    def ddp_hook(self, all_reduce):
        """A DDP comm hook that does what DDP does by default (average the bucket) and records it."""

        def hook(process_group, bucket):
            tensor = bucket.buffer()
            if self.active:
                size = dist.get_world_size(process_group)
                with self._lock:
                    self.calls.append(Call("ddp_bucket", tensor.numel(), _nbytes(tensor), size))
            tensor.div_(dist.get_world_size(process_group))
            return all_reduce(tensor, group=process_group, async_op=True).get_future().then(lambda f: f.value()[0])

        return hook


def summarise(calls: list[Call], steps: int) -> dict:
    """Per step: calls and payload bytes by kind, and in all."""
    kinds: dict[str, dict] = {}
    for c in calls:
        k = kinds.setdefault(c.kind, {"calls": 0, "bytes": 0, "group_sizes": set()})
        k["calls"] += 1
        k["bytes"] += c.nbytes
        k["group_sizes"].add(c.group_size)
    per_step = {
        kind: {
            "calls": v["calls"] / steps,
            "bytes": v["bytes"] / steps,
            "group_sizes": sorted(v["group_sizes"]),
        }
        for kind, v in sorted(kinds.items())
    }
    return {
        "per_step": per_step,
        "calls": sum(v["calls"] for v in per_step.values()),
        "bytes": sum(v["bytes"] for v in per_step.values()),
        "bn_calls": sum(v["calls"] for k, v in per_step.items() if k != "ddp_bucket"),
        "bn_bytes": sum(v["bytes"] for k, v in per_step.items() if k != "ddp_bucket"),
    }


@dataclass
class StepSpec:
    mode: str = "global"
    world_size: int = 4
    ranks_per_node: int = 2
    image_size: int = 64
    width: int = 64
    nz: int = 100
    batch: int = 4
    warmup: int = 2
    steps: int = 2
    device: str = "cpu"  # cuda: one GPU per rank, NCCL, torch.nn.SyncBatchNorm


def _setup(spec: StepSpec, rank: int):
    device = torch.device("cuda", rank) if spec.device == "cuda" else torch.device("cpu")
    model = ModelSection(spec.image_size, 3, spec.nz, spec.width, spec.width)  # type: ignore[arg-type]
    G: torch.nn.Module  # the plain networks, then DDP-wrapped ones
    D: torch.nn.Module
    G, D = build_models(model, seed=0)
    G, D = G.to(device), D.to(device)
    opt_g, opt_d = make_optimizers(G, D, OptimSection())
    node = f"node{rank // spec.ranks_per_node}" if spec.ranks_per_node else ""
    env = DistEnv(rank=rank, world_size=dist.get_world_size(), node_id=node, device=device)
    G, D = wrap_models(G, D, env, sync_bn=spec.mode)
    gen = torch.Generator().manual_seed(rank)
    real = torch.rand(spec.batch, 3, spec.image_size, spec.image_size, generator=gen) * 2 - 1
    z = torch.randn(spec.batch, spec.nz, 1, 1, generator=gen)
    return G, D, opt_g, opt_d, real.to(device), z.to(device)


def _sync(spec: StepSpec) -> None:
    if spec.device == "cuda":
        torch.cuda.synchronize()


def count_step(spec: StepSpec, rank: int) -> dict:
    """This rank's collectives of one train_step (inside an initialised process group)."""
    counter = CollectiveCounter()
    original_all_reduce = dist.all_reduce
    G, D, opt_g, opt_d, real, z = _setup(spec, rank)
    for net in (G, D):
        if hasattr(net, "register_comm_hook"):
            net.register_comm_hook(None, counter.ddp_hook(original_all_reduce))
    for _ in range(spec.warmup):
        train_step(G, D, opt_g, opt_d, real, z)
    with counter.counting():
        for _ in range(spec.steps):
            train_step(G, D, opt_g, opt_d, real, z)
    calls = counter.calls
    last = calls[len(calls) - len(calls) // spec.steps :]  # the last step's (every step makes the same calls)
    return {"summary": summarise(calls, spec.steps), "sequence": [c.__dict__ for c in last]}


def _count_worker(rank: int, spec: StepSpec, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=spec.world_size)
    try:
        result = count_step(spec, rank)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see perf/equivalence.py's _worker


def count(spec: StepSpec) -> dict:
    """Rank 0's per-step collectives for spec.mode, with real gloo workers on this machine."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _count_worker, args=(spec, os.path.join(tmp, "init"), tmp), nprocs=spec.world_size, start_method="spawn"
        )
        return json.loads(Path(tmp, "0.json").read_text())


def table(results: dict[str, dict], spec: StepSpec) -> list[str]:
    lines = [
        f"Collectives of one training step, {spec.world_size} workers ({spec.ranks_per_node or 'all'} per node), "
        f"DCGAN-{spec.image_size} ngf=ndf={spec.width}; payload per rank",
        "",
        "| dist.sync_bn | BN group | BN collectives | BN bytes | DDP buckets | DDP bytes | collectives | bytes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results.items():
        s = r["summary"]
        ddp = s["per_step"].get("ddp_bucket", {"calls": 0, "bytes": 0})
        bn_groups = sorted({g for k, v in s["per_step"].items() if k != "ddp_bucket" for g in v["group_sizes"]})
        group = "/".join(map(str, bn_groups)) or "-"
        lines.append(
            f"| {mode} | {group} | {s['bn_calls']:g} | {s['bn_bytes'] / 1e3:.1f} kB | {ddp['calls']:g} | "
            f"{ddp['bytes'] / 1e6:.2f} MB | {s['calls']:g} | {s['bytes'] / 1e6:.2f} MB |"
        )
    return lines


def hops(kind: str) -> int:
    """One-way link latencies a collective between two nodes waits for: an all-gather's parts cross once,
    an all-reduce (ring: reduce-scatter, then all-gather) twice."""
    return 1 if kind in ("all_gather", "all_gather_into_tensor", "broadcast") else 2


def step_model(summary: dict, latency_s: float, bits_per_s: float, compute_s: float, cross_node_bn: bool) -> dict:
    """The step-time model for two nodes: compute + sum over the collectives that cross between the nodes of
    (hops x one-way latency + wire bytes / bandwidth), nothing overlapped. cross_node_bn: the BN collectives
    cross (global) or stay inside a node (node). Wire bytes: an all-reduce's ring sends its payload
    2(n-1)/n = 1 times across at n = 2, an all-gather the other node's part."""
    latency = bandwidth = 0.0
    for kind, k in summary["per_step"].items():
        if kind != "ddp_bucket" and not cross_node_bn:
            continue
        latency += k["calls"] * hops(kind) * latency_s
        bandwidth += k["bytes"] * 8 / bits_per_s
    return {"latency_s": latency, "bandwidth_s": bandwidth, "step_s": compute_s + latency + bandwidth}


def model_table(summary: dict, compute_s: float = 1e-3) -> list[str]:
    """The model's step time for dist.sync_bn global, node and off across two nodes, for one-way latencies of
    0.05, 0.2 and 1 ms and links of 10 and 100 Gb/s (summary: a global count's)."""
    ddp = summary["per_step"]["ddp_bucket"]
    lines = [
        f"Step-time model, two nodes, compute {compute_s * 1e3:g} ms, nothing overlapped; per step: "
        f"{summary['bn_calls']:g} BN collectives ({summary['bn_bytes'] / 1e3:.1f} kB), "
        f"{ddp['calls']:g} DDP buckets ({ddp['bytes'] / 1e6:.2f} MB)",
        "",
        "| one-way latency | link | global: latency + bytes = step | node (and off): latency + bytes = step | "
        "global / node |",
        "|---|---|---|---|---|",
    ]
    for latency in (0.05e-3, 0.2e-3, 1e-3):
        for gbit in (10, 100):
            g = step_model(summary, latency, gbit * 1e9, compute_s, True)
            n = step_model(summary, latency, gbit * 1e9, compute_s, False)

            def cell(m: dict) -> str:
                return f"{m['latency_s'] * 1e3:.2f} + {m['bandwidth_s'] * 1e3:.2f} = {m['step_s'] * 1e3:.2f} ms"

            lines.append(
                f"| {latency * 1e3:g} ms | {gbit} Gb/s | {cell(g)} | {cell(n)} | {g['step_s'] / n['step_s']:.2f} |"
            )
    return lines


def _time_modes_worker(rank: int, spec: StepSpec, modes: list[str], rounds: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    backend = "nccl" if spec.device == "cuda" else "gloo"
    if spec.device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=spec.world_size)
    try:
        loops = {}
        for mode in modes:
            spec.mode = mode
            G, D, opt_g, opt_d, real, z = _setup(spec, rank)
            loops[mode] = (G, D, opt_g, opt_d, real, z)
            for _ in range(spec.warmup):
                train_step(*loops[mode])
        seconds: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(rounds):  # side by side, the order rotated: every mode sees the same load
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                _sync(spec)
                dist.barrier()
                started = time.perf_counter()
                for _ in range(spec.steps):
                    train_step(*loops[mode])
                _sync(spec)
                seconds[mode].append((time.perf_counter() - started) / spec.steps)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()
    os._exit(0)


def time_modes(spec: StepSpec, modes: list[str], rounds: int = 5) -> dict[str, float]:
    """Median seconds per train_step for each dist.sync_bn mode, gloo workers on this machine, timed side by
    side (rank 0's clock)."""
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _time_modes_worker,
            args=(spec, modes, rounds, os.path.join(tmp, "init"), tmp),
            nprocs=spec.world_size,
            start_method="spawn",
        )
        seconds = json.loads(Path(tmp, "0.json").read_text())
    return {mode: statistics.median(v) for mode, v in seconds.items()}


# ---------------------------------------------------------------------------------------------- timing worker


def _time(fn, reps: int) -> float:
    fn()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def replay(sequence: list[dict]):
    """The counted collectives of one step, one after another (blocking), over the whole group: what the
    step sends, without its compute and without DDP's overlap of its buckets with the backward pass."""
    tensors = [torch.zeros(max(c["numel"], 1)) for c in sequence]
    world = dist.get_world_size()

    def run():
        for c, t in zip(sequence, tensors):
            if c["kind"] == "all_gather" or c["kind"] == "all_gather_into_tensor":
                dist.all_gather([torch.empty_like(t) for _ in range(world)], t)
            else:
                dist.all_reduce(t)

    return run


def _timed_task(task: str, args) -> dict:
    if task == "latency":
        one = torch.zeros(1)
        small = torch.zeros(1 + 2 * 256)  # a BN layer's all-gather row of 256 channels
        outs = [torch.empty_like(small) for _ in range(args.world_size)]
        return {
            "latency_all_reduce_s": _time(lambda: dist.all_reduce(one), 200),
            "latency_bn_all_gather_s": _time(lambda: dist.all_gather(outs, small), 200),
        }
    if task == "bandwidth":
        big = torch.zeros(args.bandwidth_mb * 1_000_000 // 4)
        return {"bandwidth_all_reduce_s": _time(lambda: dist.all_reduce(big), 3), "bandwidth_bytes": big.numel() * 4}
    if task.startswith("replay:"):
        name, path = task.split(":", 1)[1].split("=", 1)
        sequence = json.loads(Path(path).read_text())["sequence"]
        return {f"replay_{name}_s": _time(replay(sequence), args.reps)}
    if task.startswith("step:"):
        mode = task.split(":", 1)[1]
        spec = StepSpec(mode=mode, world_size=args.world_size, ranks_per_node=args.ranks_per_node)
        spec.image_size, spec.width, spec.batch = args.image_size, args.width, args.batch
        G, D, opt_g, opt_d, real, z = _setup(spec, args.rank)
        for _ in range(2):  # DDP rebuilds its buckets after the first step
            train_step(G, D, opt_g, opt_d, real, z)
        return {f"step_{mode}_s": _time(lambda: train_step(G, D, opt_g, opt_d, real, z), args.reps)}
    raise ValueError(f"unknown task {task!r}")


def worker_main(args) -> int:
    """One rank of a timing run: `--tasks` among latency, bandwidth, replay:FILE, step:MODE; JSON to --out."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://{args.addr}:{args.port}", rank=args.rank, world_size=args.world_size
    )
    out: dict = {}
    try:
        for task in args.tasks.split(","):
            out.update(_timed_task(task, args))
        if args.rank == 0:
            Path(args.out).write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcgan_dist.perf.collectives", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("count", help="count one step's collectives per mode")
    c.add_argument("--world-size", type=int, default=4)
    c.add_argument("--ranks-per-node", type=int, default=2, help="node mode on one machine: pretended nodes")
    c.add_argument("--modes", default="global,node,off")
    c.add_argument("--image-size", type=int, default=64)
    c.add_argument("--width", type=int, default=64)
    c.add_argument("--batch", type=int, default=4)
    c.add_argument("--save", default="", help="folder: one JSON per mode with the step's sequence (for replays)")
    t = sub.add_parser("time", help="time train_step per mode with gloo workers on this machine, side by side")
    t.add_argument("--world-sizes", default="2,4")
    t.add_argument("--ranks-per-node", type=int, default=2, help="node mode on one machine: pretended nodes")
    t.add_argument("--modes", default="global,node,off")
    t.add_argument("--image-size", type=int, default=64)
    t.add_argument("--width", type=int, default=32)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--steps", type=int, default=3, help="per round")
    t.add_argument("--rounds", type=int, default=5)
    w = sub.add_parser("worker", help="one rank of a timing run (perf/netns_check.py starts them)")
    w.add_argument("--rank", type=int, required=True)
    w.add_argument("--world-size", type=int, required=True)
    w.add_argument("--ranks-per-node", type=int, default=1)
    w.add_argument("--addr", required=True)
    w.add_argument("--port", type=int, default=29531)
    w.add_argument("--tasks", required=True)
    w.add_argument("--reps", type=int, default=3)
    w.add_argument("--bandwidth-mb", type=int, default=16)
    w.add_argument("--image-size", type=int, default=64)
    w.add_argument("--width", type=int, default=32)
    w.add_argument("--batch", type=int, default=8)
    w.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker_main(args)
    if args.command == "time":
        lines = [
            f"train_step per dist.sync_bn mode, gloo on this machine, DCGAN-{args.image_size} ngf=ndf={args.width}, "
            f"batch {args.batch} per worker, {args.ranks_per_node} workers per (pretended) node; median of "
            f"{args.rounds} rounds",
            "",
            "| workers | " + " | ".join(f"{m} (ms)" for m in args.modes.split(",")) + " | global - off |",
            "|---|" + "---|" * (len(args.modes.split(",")) + 1),
        ]
        for world in (int(w) for w in args.world_sizes.split(",")):
            spec = StepSpec(
                world_size=world,
                ranks_per_node=args.ranks_per_node,
                image_size=args.image_size,
                width=args.width,
                batch=args.batch,
                steps=args.steps,
            )
            step_s = time_modes(spec, args.modes.split(","), args.rounds)
            print(json.dumps({"workers": world, "spec": spec.__dict__, "step_s": step_s}), flush=True)
            cells = " | ".join(f"{v * 1e3:.1f}" for v in step_s.values())
            extra = step_s.get("global", 0) - step_s.get("off", 0)
            lines.append(f"| {world} | {cells} | {extra * 1e3:+.1f} ms ({extra / step_s.get('off', 1) * 100:+.0f} %) |")
        print("\n".join(lines))
        return 0
    spec = StepSpec(
        world_size=args.world_size,
        ranks_per_node=args.ranks_per_node,
        image_size=args.image_size,
        width=args.width,
        batch=args.batch,
    )
    results = {}
    for mode in args.modes.split(","):
        spec.mode = mode
        results[mode] = count(spec)
        print(json.dumps({"mode": mode, "spec": spec.__dict__, **results[mode]["summary"]}))
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            Path(args.save, f"{mode}.json").write_text(json.dumps(results[mode]))
    print("\n".join(table(results, spec)))
    if "global" in results:
        print()
        print("\n".join(model_table(results["global"]["summary"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
