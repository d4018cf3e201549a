"""Is the label CAM that eX2L's penalty moves the map the decision uses? The audit's faithfulness check per method
(λ) on finished study runs: deletion and insertion AUC and ROAD of the label CAM (Grad-CAM at the predicted class)
beside a random map and a centre prior, mean ± std over seeds, as one Markdown table (docs/results.md).

    python figures/faithfulness_lambda.py --root runs/study/pretrained --root runs/study/inferred \
        --bench m2m_hard --seeds 0 1 --md docs/results.md

A method's run folder is ``<root>/<bench>/<method>/seed<k>`` in the first ``--root`` that has it finished.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from studylib.docs import rewrite_section  # noqa: E402

from ex2l_xai.fileio import atomic_write_json  # noqa: E402
from ex2l_xai.runfiles import RunFiles  # noqa: E402

METHODS = (("erm", "ERM", None), ("erm_2head", "two-head ERM (λ = 0)", 0.0),
           ("paper_dual_l0.1", "the paper's form (λ = 0.1)", 0.1), ("paper_dual_l1", "eX2L, λ = 1", 1.0),
           ("evid_dual_all_l0.1", "evidence penalty (λ = 0.1)", 0.1))
"""The issue's runs: ERM, two-head ERM, the paper's form at λ = 0.1 (eX2L's default when they ran), λ = 1 and the evidence penalty (pretrained study names)."""
KEYS = ("deletion_auc", "insertion_auc", "road_morf", "road_lerf")
MARKERS = ("<!-- faithfulness:lambda:begin -->", "<!-- faithfulness:lambda:end -->")


def find_run(roots: list[Path], bench: str, method: str, seed: int) -> Path | None:
    """The first finished run folder of (bench, method, seed) under ``roots``."""
    for root in roots:
        out = root / bench / method / f"seed{seed}"
        if RunFiles(out).is_done() and (out / "best.pt").exists():
            return out
    return None


def measure(run: Path, samples: int, steps: int) -> dict[str, Any]:
    """The audit's faithfulness check (Grad-CAM) of one run on ``samples`` test images."""
    from analysis.audit import audit_one
    from analysis.settings import AuditSettings

    settings = AuditSettings(split="test", max_samples=800, seed=0, faith_samples=samples, faith_steps=steps,
                             cam_variants=("gradcam",))
    entry = audit_one(run, settings, checks=["faithfulness"], env=False).entry
    res = entry["faithfulness"]["gradcam"]
    return {"cam": {k: res[k] for k in KEYS}, "random": res["random"], "centre": res["centre"], "n": res["n"]}


def _ms(values: list[float], digits: int = 3) -> str:
    if not values:
        return "–"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {sd:.{digits}f}"


def table(results: dict[str, list[dict[str, Any]]]) -> str:
    """One row per method: each metric for the CAM, then random and centre (mean ± std over seeds)."""
    head = ("| method | seeds | images | deletion AUC: CAM / random / centre (low = faithful) "
            "| insertion AUC: CAM / random / centre (high = faithful) | ROAD MoRF: CAM / random | ROAD LeRF: CAM / "
            "random | CAM − random, deletion (per seed) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for method, label, _ in METHODS:
        recs = results.get(method, [])
        if not recs:
            continue

        def col(key: str, which: str, recs: list[dict[str, Any]] = recs) -> str:
            return _ms([r[which][key] for r in recs])

        diffs = ", ".join(f"{r['cam']['deletion_auc'] - r['random']['deletion_auc']:+.3f}" for r in recs)
        lines.append(f"| `{method}`: {label} | {len(recs)} | {recs[0]['n']} "
                     f"| {col('deletion_auc', 'cam')} / {col('deletion_auc', 'random')} / {col('deletion_auc', 'centre')} "
                     f"| {col('insertion_auc', 'cam')} / {col('insertion_auc', 'random')} / "
                     f"{col('insertion_auc', 'centre')} "
                     f"| {col('road_morf', 'cam')} / {col('road_morf', 'random')} "
                     f"| {col('road_lerf', 'cam')} / {col('road_lerf', 'random')} | {diffs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", action="append", required=True, type=Path, help="a study root (repeatable)")
    p.add_argument("--bench", default="m2m_hard")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--samples", type=int, default=64, help="test images per run (default 64)")
    p.add_argument("--steps", type=int, default=10, help="deletion / insertion steps (8-20, default 10)")
    p.add_argument("--json", type=Path, default=Path("docs/data/faithfulness_lambda.json"))
    p.add_argument("--md", type=Path, help="rewrite the table between its markers in this Markdown file")
    args = p.parse_args(argv)
    results: dict[str, list[dict[str, Any]]] = {}
    for method, _, _ in METHODS:
        for seed in args.seeds:
            run = find_run(args.root, args.bench, method, seed)
            if run is None:
                print(f"{args.bench}/{method}/seed{seed}: no finished run under {', '.join(map(str, args.root))}")
                continue
            t0 = time.time()
            rec = {"seed": seed, "run": str(run), **measure(run, args.samples, args.steps)}
            results.setdefault(method, []).append(rec)
            print(f"{run}: deletion AUC {rec['cam']['deletion_auc']:.3f} (random {rec['random']['deletion_auc']:.3f})"
                  f" in {time.time() - t0:.0f} s", flush=True)
    atomic_write_json(args.json, {"bench": args.bench, "samples": args.samples, "steps": args.steps,
                                  "results": results}, indent=1)
    text = table(results)
    print(text)
    if args.md:
        rewrite_section(args.md, MARKERS, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
