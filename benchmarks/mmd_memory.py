"""Wall time and peak memory of ``analysis.mmd.mmd_env`` as the sample size grows.

Each size runs in a fresh subprocess (``--worker N``), so peak figures do not leak between sizes. Memory is
measured with ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set size of the worker process,
which covers torch's CPU allocations, unlike tracemalloc): the worker reads it once after the imports, the
latents and a warm-up call on 64 rows (so thread pools and libraries are loaded), and once after
the timed ``mmd_env`` calls; the difference is the working memory of the call itself. Wall time is the minimum
over ``--repeats`` calls (default 3), the usual guard against other load on a shared machine; all are kept
in the JSON. The latents (N x d float32) are resident before the call and are not in the difference.

If memory grew with N^2 (a dense kernel matrix), the working memory would grow 16x from N to 4N; the last
column printed compares the measured growth with N^2's. Last line: one JSON object with the figures.

Usage: ``python benchmarks/mmd_memory.py`` (N = 5000, 10000, 20000; d = 512; 3 environments)
or ``python benchmarks/mmd_memory.py --quick`` (N = 2500, 5000, 10000; under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def worker(n: int, dim: int, n_envs: int, block_size: int, seed: int, repeats: int) -> dict:
    """Run mmd_env ``repeats`` times on N x dim float32 latents in this process; time and memory figures."""
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from analysis.mmd import mmd_env

    rng = np.random.default_rng(seed)
    envs = rng.integers(0, n_envs, n)
    latents = rng.standard_normal((n, dim), dtype=np.float32)
    latents += (0.1 * envs[:, None]).astype(np.float32)  # small environment shift
    mmd_env(latents[:64], envs[:64], block_size=block_size)  # warm-up: thread pools, kernels
    before = _maxrss_mb()
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = mmd_env(latents, envs, block_size=block_size, seed=seed)
        walls.append(time.perf_counter() - t0)
    peak = _maxrss_mb()
    return {
        "n": n,
        "dim": dim,
        "wall_s": round(min(walls), 3),
        "wall_s_all": [round(w, 3) for w in walls],
        "rss_before_mb": round(before, 1),
        "peak_rss_mb": round(peak, 1),
        "call_mb": round(peak - before, 1),
        "latents_mb": round(latents.nbytes / 2**20, 1),
        "dense_pooled_kernel_mb": round(8 * n * n / 2**20, 1),
        "mmd_env": res["mmd_env"],
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="N = 2500, 5000, 10000 instead of 5000, 10000, 20000"
    )
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--envs", type=int, default=3)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per N; the minimum is reported")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.dim, args.envs, args.block_size, args.seed, args.repeats)))
        return 0

    sizes = [2500, 5000, 10000] if args.quick else [5000, 10000, 20000]
    rows = []
    for n in sizes:
        cmd = [sys.executable, __file__, "--worker", str(n), "--dim", str(args.dim), "--envs", str(args.envs)]
        cmd += [
            "--block-size",
            str(args.block_size),
            "--seed",
            str(args.seed),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))

    base = rows[0]
    print(
        f"mmd_env, {args.envs} environments, d = {args.dim}, float32 latents, block {args.block_size}; "
        f"{platform.processor() or platform.machine()}, torch threads {base['torch_threads']}"
    )
    head = f"{'N':>6} {'wall s':>8} {'call MB':>8} {'peak RSS MB':>12} {'latents MB':>11} {'dense K MB':>11}"
    print(head + f" {'call MB ratio':>14} {'N^2 ratio':>10}")
    for r in rows:
        ratio = r["call_mb"] / base["call_mb"] if base["call_mb"] > 0 else float("nan")
        r["call_mb_ratio"] = round(ratio, 2)
        r["n2_ratio"] = round((r["n"] / base["n"]) ** 2, 2)
        print(
            f"{r['n']:>6} {r['wall_s']:>8.2f} {r['call_mb']:>8.1f} {r['peak_rss_mb']:>12.1f} "
            f"{r['latents_mb']:>11.1f} {r['dense_pooled_kernel_mb']:>11.1f} {ratio:>14.2f} {r['n2_ratio']:>10.1f}"
        )
    last = rows[-1]
    summary = {
        "benchmark": "mmd_memory",
        "quick": args.quick,
        "dim": args.dim,
        "envs": args.envs,
        "block_size": args.block_size,
        "method": "ru_maxrss delta around the calls, one fresh subprocess per N; wall = min over repeats",
        "repeats": args.repeats,
        "rows": rows,
        "largest_n": last["n"],
        "largest_wall_s": last["wall_s"],
        "largest_call_mb": last["call_mb"],
        "call_mb_growth": last["call_mb_ratio"],
        "n2_growth": last["n2_ratio"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
