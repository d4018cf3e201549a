"""Training step time in one process against DDP over two processes (``torchrun``), side by side in one run.

Each configuration trains the same global batch with the trainer's own pieces (the algorithm, the global-batch
batch norms, ``DistributedDataParallel`` around the algorithm's step, :func:`ex2l_xai.train.optimizer_step`):

- ``1 proc x T threads``: one process, the whole batch (T = the threads DDP uses in total, and T = 1);
- ``2 proc x T/2 threads``: ``torchrun --nproc_per_node 2`` (gloo on the CPU, nccl on CUDA), half the batch each.

It reports the median milliseconds per global step and the speed-up of DDP over one process with as many threads
in total. On a CPU, two processes share the cores one process would use with its threads, and pay for the
all-reduce of every gradient and of every batch norm's statistics, so no speed-up is expected: the numbers say
how much DDP costs there. On a machine with 2 GPUs, ``--device cuda`` compares one GPU with two. Usage::

    python benchmarks/ddp_step_time.py [--threads 2] [--steps 20] [--batch-size 64] [--image-size 64]
                                       [--device cpu|cuda] [--algorithms erm ex2l]

The last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _overrides(args: argparse.Namespace, algorithm: str) -> list[str]:
    return [
        f"algorithm.name={algorithm}",
        f"data.batch_size={args.batch_size}",
        f"data.options.image_size={args.image_size}",
        "data.options.per_group=32",
        f"model.width={args.width}",
        f"train.device={args.device}",
    ]


def worker(args: argparse.Namespace) -> None:
    """Time ``--steps`` training steps (after 3 warm-up steps) in this process (rank of a torchrun or alone) and
    write the per-step seconds of rank 0 to ``--out`` as JSON."""
    from ex2l_xai import distributed
    from ex2l_xai.algorithms import StepContext
    from ex2l_xai.config import load_config
    from ex2l_xai.train import (
        build_datasets,
        build_optimizer,
        build_run_algorithm,
        optimizer_step,
        train_loader,
    )
    from ex2l_xai.train.loop import StepModule
    from ex2l_xai.train.syncbn import sync_batchnorm

    torch.set_num_threads(args.threads)
    config = load_config("quick", _overrides(args, args.algorithm))
    backend = "nccl" if args.device == "cuda" else "gloo"
    with distributed.process_group(backend):
        rank, world = distributed.rank(), distributed.world_size()
        device = torch.device("cuda", distributed.local_rank()) if args.device == "cuda" else torch.device("cpu")
        data = build_datasets(config)["train"]
        algorithm = build_run_algorithm(config, data, device)
        stage = algorithm.stages()[0]
        stepper = StepModule(algorithm)
        step_fn = stepper
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            sync_batchnorm(algorithm, device)
            step_fn = DistributedDataParallel(stepper, forward_sync_buffers=False,
                                              find_unused_parameters=algorithm.ddp_find_unused_parameters())
        optimizers = algorithm.configure_optimizers(lambda p: build_optimizer(config, p), stage)
        batches = [
            {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
            for b in train_loader(config, data, seed=0, device=device, rank=rank, world=world)
        ]
        batches = [b for b in batches if len(b["label"]) == config.data.batch_size // world]  # full batches only
        algorithm.train()
        times = []
        for i in range(args.steps + 3):
            batch = batches[i % len(batches)]
            distributed.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step_fn(batch, StepContext(0, i, stage))
            out = stepper.last
            assert out is not None
            out.loss = loss
            optimizer_step(out, optimizers, 0.0)
            if device.type == "cuda":
                torch.cuda.synchronize()
            distributed.barrier()
            if i >= 3:
                times.append(time.perf_counter() - t0)
        if distributed.is_main():
            Path(args.out).write_text(json.dumps(times))


def measure(args: argparse.Namespace, algorithm: str, procs: int, threads: int) -> float:
    """Median seconds per global step of ``procs`` processes of ``threads`` threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        script = [str(Path(__file__).resolve()), "--worker", "--algorithm", algorithm, "--out", str(out),
                  "--threads", str(threads), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                  "--image-size", str(args.image_size), "--width", str(args.width), "--device", args.device]
        cmd = [sys.executable, *script] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs), *script]
        # passive OpenMP waiting, as `ex2l` sets it: spinning threads make a shared CPU many times slower
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return statistics.median(json.loads(out.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="threads in total (split between DDP's processes)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64, help="the global batch")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16, help="small_cnn width")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--algorithms", nargs="+", default=["erm", "ex2l"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", default="erm", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    half = max(1, args.threads // 2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"platform: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average {load:.1f} "
          f"at the start), torch {torch.__version__}, device {args.device}; global batch {args.batch_size}, "
          f"{args.image_size} px, small_cnn width {args.width}, median of {args.steps} steps")
    print(f"{'algorithm':<10}{'setting':<24}{'ms/step':>10}{'vs 1 proc':>11}")
    rows = []
    for algorithm in args.algorithms:
        settings = [(1, 1), (1, args.threads), (2, half)] if args.device == "cpu" else [(1, 1), (2, 1)]
        ms = {s: 1000 * measure(args, algorithm, *s) for s in settings}
        base = ms[(1, args.threads)] if args.device == "cpu" else ms[(1, 1)]
        for (procs, threads), value in ms.items():
            label = f"{procs} proc x {threads} thread{'s' if threads > 1 else ''}"
            if args.device == "cuda":
                label = f"{procs} GPU{'s' if procs > 1 else ''} ({procs} proc)"
            print(f"{algorithm:<10}{label:<24}{value:>10.1f}{base / value:>10.2f}x")
            rows.append({"algorithm": algorithm, "processes": procs, "threads": threads, "ms_per_step": value,
                         "speedup_vs_one_process": base / value})
    print(json.dumps({"device": args.device, "batch_size": args.batch_size, "image_size": args.image_size,
                      "rows": rows}))


if __name__ == "__main__":
    main()
