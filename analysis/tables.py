"""The main results table over seeds: mean ± std of each (dataset, algorithm)'s accuracies, from run folders'
``results.json`` (what ``ex2l figures`` writes as ``table_results.md``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.adapter import PRETTY
from analysis.audit import load_results
from ex2l_xai.errors import Ex2lError

__all__ = ["markdown_table", "results_table"]


def results_table(
    run_dirs: Sequence[str | os.PathLike[str]], split: str = "test"
) -> list[dict[str, Any]]:
    """Mean ± std (over seeds) of ``avg_acc`` and ``worst_group_acc`` per (dataset, algorithm), from the runs'
    ``results.json``; rows in first-appearance order with ``n`` (runs) and ``seeds``. std is the sample standard
    deviation (ddof=1; 0 for a single run)."""
    from ex2l_xai.train import load_run_config

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in run_dirs:
        res = load_results(run)
        if res is None:
            raise Ex2lError(f"{run}: no results.json; expected a finished run folder (written by `ex2l train`)")
        if split not in res:
            raise Ex2lError(f"{run}/results.json has no {split!r} metrics (keys: {', '.join(res)})")
        algo, dset = res.get("algorithm"), res.get("dataset")
        if algo is None or dset is None:
            config = load_run_config(run)
            algo, dset = algo or config.algorithm_name, dset or config.data.name
        groups.setdefault((str(dset), str(algo)), []).append({**res[split], "seed": res.get("seed"), "run": str(run)})
    rows = []
    for (dset, algo), items in groups.items():
        row: dict[str, Any] = {"dataset": dset, "algorithm": algo, "n": len(items),
                               "seeds": [i["seed"] for i in items], "runs": [i["run"] for i in items]}
        for key in ("avg_acc", "worst_group_acc"):
            v = np.asarray([i[key] for i in items], dtype=np.float64)
            row[key] = float(np.mean(v))
            row[f"{key}_std"] = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
        rows.append(row)
    return rows


def markdown_table(rows: Sequence[dict[str, Any]], split: str = "test") -> str:
    """The main results table (from :func:`results_table`) as Markdown: accuracies in %, mean ± std over seeds."""
    multi = len({r["dataset"] for r in rows}) > 1
    head = (["Dataset"] if multi else []) + ["Algorithm", f"{split} avg acc. (%)", f"{split} worst-group acc. (%)",
                                            "Seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * (len(head) - 3) + ["---:"] * 3) + "|"]
    for r in rows:
        cells = ([r["dataset"]] if multi else []) + [
            _pretty_algorithm(r["algorithm"]),
            f"{100 * r['avg_acc']:.1f} ± {100 * r['avg_acc_std']:.1f}",
            f"{100 * r['worst_group_acc']:.1f} ± {100 * r['worst_group_acc_std']:.1f}",
            str(r["n"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    datasets = sorted({r["dataset"] for r in rows})
    note = (f"\nTest metrics of each run's selected epoch ({', '.join(datasets)}); mean ± sample standard deviation "
            "over seeds (± 0.0 for a single run).\n")
    return "\n".join(lines) + "\n" + note


def _pretty_algorithm(name: str) -> str:
    return PRETTY.get(str(name).lower(), str(name))
