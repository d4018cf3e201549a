"""Calibrate a benchmark before comparing methods on it: what frozen backbone features already know.

Linear probes (scikit-learn's standardised logistic regression) on the pooled last-block features of the
preset's backbone, never trained, on the preset's data:

- ``label, fit on train``: a linear head on frozen features, fitted on the training distribution (what a model
  that learns no features gets; if this is already at the validation ceiling and 0 % test WGA, the benchmark is
  a pure shortcut test);
- ``label, fit on oracle_val``: the same probe fitted on ``oracle_val`` (the test environments, disjoint from
  test): is the label linearly decodable on the test backgrounds at all? The room a method has to win;
- ``confounder, fit on train``: is the background decodable (the shortcut's strength)?

Test average and worst-group accuracy of each, as JSON and a Markdown table::

    python figures/calibrate.py --preset pretrained --out calibration.json
    python figures/calibrate.py --preset pretrained --set data.options.object_scale=1.5

**A knob sweep** (``--sweep KEY=V1,V2,...``) prints, for each value, the probes above and ERM trained with the
preset as shipped (``--erm-seeds``, default 0 1 2), against the criteria written before any method is compared
(:data:`CRITERIA`): ERM's test AA in the paper's range, its worst group well below its average, and the label
probe fitted on ``oracle_val`` near 100 % (the shape is learnable). ERM is trained for ``--epochs`` (more than the
preset's); the preset's numbers are read at its own epochs from the same runs (a constant learning rate and
per-epoch seeding make the first epochs of a longer run those of the preset's run), and the longer curve gives the
**training budget**: the epoch after which ERM's mean validation cross-entropy stops improving (:func:`budget`)::

    python figures/calibrate.py --sweep data.options.object_scale=1.0,1.25,1.5 --root runs/calibrate --jobs 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

from ex2l_xai.backbones import build_backbone
from ex2l_xai.config import load_config
from ex2l_xai.fileio import atomic_write_json
from ex2l_xai.metrics import group_metrics
from ex2l_xai.runfiles import RunFiles
from ex2l_xai.train.builders import build_datasets


@torch.no_grad()
def pooled_features(backbone: torch.nn.Module, dataset: Any, batch_size: int = 64) -> np.ndarray:
    """Global-average-pooled last-block features of every sample of ``dataset`` (N, C)."""
    backbone.eval()
    out = [backbone(b["image"]).mean(dim=(2, 3)) for b in DataLoader(dataset, batch_size=batch_size)]
    return torch.cat(out).numpy()


def probe(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, c: float = 1.0, seed: int = 0) -> np.ndarray:
    """Predictions on ``x_test`` of a standardised logistic regression fitted on ``(x_fit, y_fit)``."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    return model.fit(x_fit, y_fit).predict(x_test)


def calibrate(overrides: list[str], preset: str = "pretrained", c: float = 1.0) -> dict[str, Any]:
    """The three probes of the module docstring on ``preset`` with ``overrides``: test metrics of each."""
    config = load_config(preset, overrides)
    if config.model.pretrained == "none":
        raise ValueError(f"preset {preset!r} has model.pretrained: none: frozen random features calibrate nothing")
    data = build_datasets(config)
    for split in ("train", "oracle_val", "test"):
        if split not in data:
            raise ValueError(f"dataset {config.data.name!r} has no {split!r} split: the probes need train, "
                             "oracle_val (test environments) and test")
    backbone = build_backbone(config.model.backbone, config.model.pretrained, config.model.width)
    t0 = time.time()
    feats = {s: pooled_features(backbone, data[s]) for s in ("train", "oracle_val", "test")}
    test = data["test"]  # CachedDataset forwards labels, confounders, group_ids and groups to the dataset

    def labels(split: str, what: str) -> np.ndarray:
        return data[split].labels if what == "label" else data[split].confounders

    results: dict[str, Any] = {"preset": preset, "overrides": overrides, "backbone": config.model.backbone,
                               "n": {s: len(f) for s, f in feats.items()}, "C": c}
    for key, what, fit in (("label_fit_train", "label", "train"), ("label_fit_oracle_val", "label", "oracle_val"),
                           ("confounder_fit_train", "confounder", "train")):
        pred = probe(feats[fit], labels(fit, what), feats["test"], c=c, seed=config.seed)
        truth = labels("test", what)
        m = group_metrics(pred, truth, test.group_ids, test.groups)
        results[key] = {"avg_acc": m["avg_acc"], "worst_group_acc": m["worst_group_acc"]}
    results["seconds"] = round(time.time() - t0, 1)
    return results


def markdown(results: dict[str, Any]) -> str:
    """One table: probe, test AA, test WGA (percent)."""
    rows = ["| probe on frozen features | test AA | test WGA |", "|---|---|---|"]
    for key, title in (("label_fit_train", "label, fitted on train"),
                       ("label_fit_oracle_val", "label, fitted on oracle_val (test environments)"),
                       ("confounder_fit_train", "confounder (background), fitted on train")):
        r = results[key]
        rows.append(f"| {title} | {100 * r['avg_acc']:.1f} | {100 * r['worst_group_acc']:.1f} |")
    return "\n".join(rows)


# ---- the knob sweep: criteria written before any method is compared ----------------------------------------
CRITERIA = {
    "erm_aa": ("ERM test AA (the preset as shipped, val-selected) in the paper's range", 0.60, 0.80),
    "erm_gap": ("ERM test WGA at least 20 points below its AA (room in the worst group)", 0.20, 1.0),
    "oracle_probe": ("label probe fitted on oracle_val: test AA >= 95 % (the shape is learnable)", 0.95, 1.0),
}
"""Criterion -> (what it asks, lower bound, upper bound), checked on the mean over ERM's seeds."""
ERM = ["algorithm.name=erm", "model.architecture=shared"]
PLAIN = ["data.options.benchmark=none"]
"""A sweep varies a knob from the plain challenge: no named benchmark variant may set the knob behind its back."""


def erm_overrides(knob: str, seed: int, epochs: int) -> list[str]:
    """ERM with the preset as shipped, ``knob`` (``key=value``) set, trained for ``epochs`` and evaluated each."""
    return [*ERM, *PLAIN, knob, f"seed={seed}", f"train.epochs={epochs}", "train.eval_every=1"]


def _train_erm(preset: str, overrides: list[str], out: str, threads: int) -> str:
    """Worker: train (or resume, or skip) one ERM run folder."""
    torch.set_num_threads(threads)
    from ex2l_xai.train import train

    train(load_config(preset, overrides), out, quiet=True)
    return out


def erm_dir(root: Path, knob: str, seed: int) -> Path:
    """The run folder of ERM at one knob value and seed."""
    return root / knob.replace("=", "_") / f"erm_seed{seed}"


def train_erm_runs(preset: str, knobs: list[str], seeds: list[int], epochs: int, root: Path, jobs: int,
                   threads: int) -> None:
    """Train the sweep's ERM runs (resumable: finished folders are skipped) on ``jobs`` local processes."""
    from ex2l_xai.launch import Job, LaunchOptions, launch

    wave = [Job(f"{k}/erm_seed{s}", _train_erm, (preset, erm_overrides(k, s, epochs), str(erm_dir(root, k, s)),
                                                  threads), skip_if=str(RunFiles(erm_dir(root, k, s)).done_file))
            for s in seeds for k in knobs]
    report = launch([wave], LaunchOptions(workers=jobs), root / "logs", name="calibrate")
    if report.failed:
        raise RuntimeError("calibration runs failed: " + "; ".join(f"{f.name} ({f.log})" for f in report.failed))


def preset_epoch(records: list[dict[str, Any]], epochs: int) -> dict[str, Any]:
    """The record the preset's selection picks among the first ``epochs`` evaluations: best validation WGA, ties
    broken by the lower validation cross-entropy, then the earlier epoch (as ``ex2l_xai.train`` selects)."""
    first = [r for r in records if r["epoch"] <= epochs]
    return max(first, key=lambda r: (r["val"]["worst_group_acc"], -r["val"]["nll"], -r["epoch"]))


def budget(curves: list[list[float]], patience: int = 2, min_delta: float = 1e-3) -> int:
    """The epoch (1-based) after which the mean validation cross-entropy of ``curves`` (one list per seed, one
    value per epoch) stops improving, as early stopping reads it: the last epoch that lowered the running best
    by more than ``min_delta`` nats, once ``patience`` epochs in a row have not; the last epoch if it never stops.
    The CE of a training-distribution split keeps shrinking as the model grows confident (relative changes never
    stop), so the threshold is absolute: below 1e-3 nats a step changes the mean probability of the true class by
    less than 0.1 %."""
    mean = np.mean(np.asarray(curves, dtype=float), axis=0)
    best, best_epoch, waited = mean[0], 1, 0
    for e, v in enumerate(mean[1:], start=2):
        if v < best - min_delta:
            best, best_epoch, waited = v, e, 0
        else:
            waited += 1
            if waited >= patience:
                break
    return best_epoch


def sweep_row(preset: str, knob: str, seeds: list[int], root: Path, preset_epochs: int, c: float) -> dict[str, Any]:
    """Probes and ERM (the preset's epochs, and the whole curve) at one knob value, with the criteria checked."""
    row: dict[str, Any] = {"knob": knob, "probes": calibrate([*PLAIN, knob], preset, c), "erm": [], "val_nll": [],
                           "curve": []}
    for s in seeds:
        recs = RunFiles(erm_dir(root, knob, s)).read_metrics()
        sel = preset_epoch(recs, preset_epochs)
        row["erm"].append({"seed": s, "epoch": sel["epoch"], "test_aa": sel["test"]["avg_acc"],
                           "test_wga": sel["test"]["worst_group_acc"], "val_wga": sel["val"]["worst_group_acc"]})
        row["val_nll"].append([r["val"]["nll"] for r in recs])
        row["curve"].append([{"epoch": r["epoch"], "val_nll": r["val"]["nll"], "test_aa": r["test"]["avg_acc"],
                              "test_wga": r["test"]["worst_group_acc"]} for r in recs])
    aa = float(np.mean([r["test_aa"] for r in row["erm"]]))
    wga = float(np.mean([r["test_wga"] for r in row["erm"]]))
    values = {"erm_aa": aa, "erm_gap": aa - wga, "oracle_probe": row["probes"]["label_fit_oracle_val"]["avg_acc"]}
    row["criteria"] = {k: {"value": v, "pass": CRITERIA[k][1] <= v <= CRITERIA[k][2]} for k, v in values.items()}
    row["passes"] = all(x["pass"] for x in row["criteria"].values())
    row["budget_epochs"] = budget(row["val_nll"])
    return row


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    """The calibration table of a sweep: probes, ERM at the preset's epochs (mean ± std), criteria, budget."""
    out = ["| knob | label probe, train (AA / WGA) | label probe, oracle_val (AA / WGA) | background probe (AA) | "
           "ERM test AA | ERM test WGA | criteria met | val CE stops improving after |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["probes"]
        aa = [100 * e["test_aa"] for e in r["erm"]]
        wga = [100 * e["test_wga"] for e in r["erm"]]
        met = ", ".join(k for k, v in r["criteria"].items() if v["pass"]) or "none"
        out.append(
            f"| {r['knob']} | {100 * p['label_fit_train']['avg_acc']:.1f} / {100 * p['label_fit_train']['worst_group_acc']:.1f}"
            f" | {100 * p['label_fit_oracle_val']['avg_acc']:.1f} / {100 * p['label_fit_oracle_val']['worst_group_acc']:.1f}"
            f" | {100 * p['confounder_fit_train']['avg_acc']:.1f} | {np.mean(aa):.1f} ± {np.std(aa, ddof=1):.1f}"
            f" | {np.mean(wga):.1f} ± {np.std(wga, ddof=1):.1f} | {'all' if r['passes'] else met}"
            f" | epoch {r['budget_epochs']} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pretrained")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. data.options.object_scale=1.5")
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the probes")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--sweep", default="", help="KEY=V1,V2,...: calibrate each value (probes + ERM + criteria)")
    ap.add_argument("--erm-seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12, help="ERM's epochs in a sweep (the budget curve)")
    ap.add_argument("--root", default="runs/calibrate", help="the sweep's ERM run folders (resumable)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.sweep:
        key, _, values = args.sweep.partition("=")
        knobs = [f"{key}={v}" for v in values.split(",") if v]
        if args.set:
            ap.error("--set and --sweep: give the knob in --sweep only (the preset is the one as shipped)")
        if not key or not knobs:
            ap.error(f"--sweep {args.sweep!r}: expected KEY=V1,V2,...")
        root = Path(args.root)
        train_erm_runs(args.preset, knobs, args.erm_seeds, args.epochs, root, args.jobs,
                       args.threads)
        preset_epochs = load_config(args.preset, []).train.epochs
        rows = [sweep_row(args.preset, k, args.erm_seeds, root, preset_epochs, args.C) for k in knobs]
        results: dict[str, Any] = {"preset": args.preset, "criteria": CRITERIA, "preset_epochs": preset_epochs,
                                   "epochs": args.epochs, "rows": rows}
        table = sweep_markdown(rows)
    else:
        results = calibrate(args.set, args.preset, args.C)
        table = markdown(results)
    if args.out:
        atomic_write_json(Path(args.out), results, indent=1)
    print(json.dumps(results, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
