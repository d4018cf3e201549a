"""Do the audit's slices recover what nobody told it? The ``slices`` check on finished ERM runs, scored against the
benchmark's true backgrounds (ARI and NMI overall and the class mean, k per class, the worst slice's accuracy
beside the true worst group's), per benchmark, mean ± std over seeds, as one Markdown table.

    python figures/slice_recovery.py --root runs/study/inferred --bench m2m_hard m2m_hard_min5 --seeds 0 1 2 \
        --md docs/auditing.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from studylib.docs import rewrite_section  # noqa: E402

from ex2l_xai.fileio import atomic_write_json  # noqa: E402
from ex2l_xai.runfiles import RunFiles  # noqa: E402

MARKERS = ("<!-- slices:recovery:begin -->", "<!-- slices:recovery:end -->")
KEYS = ("ari", "nmi", "ari_class_mean", "nmi_class_mean", "worst_slice_acc", "true_worst_group_acc")


def score(run: Path, max_samples: int) -> dict[str, Any]:
    """The audit's slice check on the test split of one run: its ``discovery`` numbers."""
    from analysis.audit import audit_one
    from analysis.settings import AuditSettings

    entry = audit_one(run, AuditSettings(split="test", max_samples=max_samples, seed=0), checks=["slices"],
                      env=False).entry
    disc = entry["discovery"]
    return {**{k: disc[k] for k in KEYS}, "k": disc["k"], "n": entry["n_samples"]}


def _ms(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {sd:.2f}"


def table(results: dict[str, list[dict[str, Any]]], method: str) -> str:
    """One row per benchmark (mean ± std over seeds)."""
    lines = [f"| benchmark (`{method}`, test split) | seeds | images | ARI | NMI | ARI, class mean | NMI, class mean "
             "| k per class (seed 0) | worst slice acc. | true worst group acc. |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for bench, recs in results.items():
        ks = ", ".join(f"{c} {k}" for c, k in recs[0]["k"].items())
        lines.append(f"| {bench} | {len(recs)} | {recs[0]['n']} | " + " | ".join(
            _ms([r[k] for r in recs]) for k in KEYS[:4]) + f" | {ks} | " + " | ".join(
            _ms([r[k] for r in recs]) for k in KEYS[4:]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", type=Path, required=True, help="a study root: <root>/<bench>/<method>/seed<k>")
    p.add_argument("--bench", nargs="+", default=["m2m_hard", "m2m_hard_min5"])
    p.add_argument("--method", default="erm")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-samples", type=int, default=2000, help="test images audited (default: the audit's)")
    p.add_argument("--json", type=Path, default=Path("docs/data/slice_recovery.json"))
    p.add_argument("--md", type=Path, help="rewrite the table between its markers in this Markdown file")
    args = p.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    for bench in args.bench:
        for seed in args.seeds:
            run = args.root / bench / args.method / f"seed{seed}"
            if not RunFiles(run).is_done():
                print(f"{run}: not a finished run, left out")
                continue
            rec = {"seed": seed, **score(run, args.max_samples)}
            results.setdefault(bench, []).append(rec)
            print(f"{run}: ARI {rec['ari']:.3f}, NMI {rec['nmi']:.3f}", flush=True)
    atomic_write_json(args.json, {"method": args.method, "results": results}, indent=1)
    text = table(results, args.method)
    print(text)
    if args.md:
        rewrite_section(args.md, MARKERS, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
