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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="pretrained")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. data.options.object_scale=1.5")
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the probes")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    results = calibrate(args.set, args.preset, args.C)
    if args.out:
        atomic_write_json(Path(args.out), results, indent=1)
    print(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
