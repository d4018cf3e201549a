"""One record per finished run of a study: the epoch validation selects, the oracle's and the last epoch's test
numbers, the epoch the worst-group validation cross-entropy selects, and the run's diagnostics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ex2l_xai.runfiles import RunFiles
from studylib.regimes import Regime
from studylib.runner import DIAGNOSTICS, INFERRED, run_dir

Table = dict[str, dict[str, list[dict[str, Any]]]]
"""benchmark -> method -> one record per finished seed."""


def _best(recs: list[dict[str, Any]], key: Any) -> dict[str, Any]:
    return max(recs, key=key)


def record(out: Path, seed: int) -> dict[str, Any]:
    """The study's record of one finished run folder (``results.json``, ``metrics.jsonl`` and diagnostics)."""
    run = RunFiles(out)
    res = run.read_results()
    recs = [r for r in run.read_metrics() if "val" in r]
    oracle = _best(recs, lambda r: (r["oracle_val"]["worst_group_acc"], -r["epoch"])) if "oracle_val" in recs[0] else None
    # worst-group validation cross-entropy (runs written before it was logged lack it: None)
    wgce = (_best(recs, lambda r: (-r["val"]["worst_group_nll"], -r["epoch"]))
            if all("worst_group_nll" in r["val"] for r in recs) else None)
    sel = next((r for r in recs if r["epoch"] == res["selected_epoch"]), recs[-1])
    extra = json.loads((out / DIAGNOSTICS).read_text()) if (out / DIAGNOSTICS).exists() else {}
    stats = sel.get("stats") or {}
    return {
        "seed": seed,
        "selected_epoch": res["selected_epoch"],
        "val_wga": res["val"]["worst_group_acc"],
        "val_nll": res["val"].get("nll"),
        "test_aa": res["test"]["avg_acc"],
        "test_wga": res["test"]["worst_group_acc"],
        "test_mga": res["test"].get("mean_group_acc"),
        "last_test_aa": recs[-1]["test"]["avg_acc"],
        "last_test_wga": recs[-1]["test"]["worst_group_acc"],
        "oracle_val_wga": oracle["oracle_val"]["worst_group_acc"] if oracle else None,
        "oracle_epoch": oracle["epoch"] if oracle else None,
        "oracle_test_aa": oracle["test"]["avg_acc"] if oracle else None,
        "oracle_test_wga": oracle["test"]["worst_group_acc"] if oracle else None,
        "wgce_epoch": wgce["epoch"] if wgce else None,
        "wgce_val": wgce["val"]["worst_group_nll"] if wgce else None,
        "wgce_test_aa": wgce["test"]["avg_acc"] if wgce else None,
        "wgce_test_wga": wgce["test"]["worst_group_acc"] if wgce else None,
        "epochs": len(recs),
        "train_zero_cam": stats.get("zero_cam_share"),
        "train_penalty": stats.get("penalty_mean"),
        "wall_seconds": res.get("wall_seconds"),
        **{f"m_{k}": v for k, v in extra.items()},
    }


def collect(root: Path, regime: Regime, seeds: Sequence[int] | None = None) -> Table:
    """Per benchmark and method, one record per finished seed (each method's own seeds, or ``seeds``)."""
    table: Table = {}
    for b in regime.benchmarks:
        for m in regime.methods_of(b):
            for s in regime.seeds_of(m):
                out = run_dir(root, b, m, s)
                if (seeds is None or s in seeds) and RunFiles(out).is_done():
                    rec = record(out, s)
                    if m in regime.confounders_from:
                        rec.update(inferred_record(run_dir(root, b, regime.confounders_from[m], s) / INFERRED))
                    table.setdefault(b, {}).setdefault(m, []).append(rec)
    return table


def inferred_record(table: Path) -> dict[str, Any]:
    """What the inference behind a run found (its report ``<table>.json``): k and the agreement on train."""
    path = Path(f"{table}.json")
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    train = report["splits"].get(report["fitted_on"], {})
    return {"inferred_k": report["k"], "inferred_ari": train.get("ari"), "inferred_nmi": train.get("nmi"),
            "inferred_group_ari": train.get("group_ari")}
