"""The eX2L study: which settings of the penalty work, measured on the built-in benchmark (docs/results.md).

Every configuration is a run folder ``<root>/<benchmark>/<method>/seed<k>`` trained with ``ex2l_xai.train``;
a folder with ``done`` is skipped, an unfinished one resumes, so the sweep can be stopped and restarted at
will. After training, each run gets ``study_metrics.json``: on the test split, the share of all-zero label
CAMs, the share of label-CAM mass inside the object mask, and the decision-level leak (a linear probe that
predicts the background from the label logits within each label; analysis.probes).

    python figures/study.py all --jobs 2 --md docs/results.md   # everything: train (resumable), then the tables
    python figures/study.py run --jobs 2              # train every configuration (resumable), progress bars
    python figures/study.py report --md docs/results.md   # aggregate; rewrite the tables of docs/results.md
    python figures/study.py run --only m2m_hard --seeds 0   # a subset

Model selection, as DomainBed: within a run the epoch is chosen on the training-distribution validation split
(``val``, worst-group accuracy); the *oracle* column re-chooses the epoch on ``oracle_val``, a split drawn from
the test environments and disjoint from test. eX2L's default is the variant with the best mean validation
worst-group accuracy (training distribution) over the benchmarks; the oracle choice is reported beside it,
labelled as such. Test numbers never choose anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("study")

BASE_PRESET = "quick"
# The study's benchmark size and training budget, pinned here so later changes of the quick preset cannot
# change it: 64 px images, 300 images per class and training environment (1920 train images after carving
# validation), small CNN width 16 with one backbone unless a method says otherwise, Adam 3e-3, cosine, 25 epochs.
BASE_OVERRIDES: list[str] = [
    "data.batch_size=64",
    "model.backbone=small_cnn",
    "model.width=16",
    "model.architecture=shared",
    "model.cam_layer=layer4",
    "optim.name=adam",
    "optim.lr=0.003",
    "optim.weight_decay=0.0",
    "schedule.name=cosine",
    "data.options.image_size=64",
    "data.options.per_group=300",
    "data.options.test_per_group=100",
    "train.epochs=25",
]

# Benchmarks: (description, overrides, methods or None for all). The ``_big`` ones are the calibrated benchmark:
# objects 1.5x larger (object_scale 1.5), so the shape is learnable from scratch as dogs are for a pretrained
# ResNet on Spawrious; the plain ones keep the default objects, where no method learns the shape (results.md).
_BIG = ["data.options.object_scale=1.5"]
_CALIBRATED_METHODS = ("erm", "erm_2head", "groupdro", "paper_l0.1", "paper_sg_l0.1", "paper_dual_l0.1",
                       "evid_all_l0.1", "evid_all_l1", "evid_dual_all_l1")
BENCHMARKS: dict[str, tuple[str, list[str], tuple[str, ...] | None]] = {
    "m2m_hard": ("synthetic m2m_hard, 100 % spurious (Spawrious' table)", ["data.options.challenge=m2m_hard"], None),
    "o2o_hard": ("synthetic o2o_hard (97 % / 87 % spurious)", ["data.options.challenge=o2o_hard"], None),
    "m2m_hard_min5": (
        "synthetic m2m_hard with minority_fraction 0.05",
        ["data.options.challenge=m2m_hard", "data.options.minority_fraction=0.05"],
        None,
    ),
    "m2m_hard_big": ("calibrated: m2m_hard, 100 % spurious, object_scale 1.5",
                     ["data.options.challenge=m2m_hard", *_BIG], _CALIBRATED_METHODS),
    "o2o_hard_big": ("calibrated: o2o_hard, object_scale 1.5", ["data.options.challenge=o2o_hard", *_BIG],
                     _CALIBRATED_METHODS),
    "m2m_hard_min5_big": (
        "calibrated: m2m_hard, minority_fraction 0.05, object_scale 1.5",
        ["data.options.challenge=m2m_hard", "data.options.minority_fraction=0.05", *_BIG],
        _CALIBRATED_METHODS,
    ),
}


def methods_of(bench: str) -> tuple[str, ...]:
    """The methods run on benchmark ``bench``."""
    chosen = BENCHMARKS[bench][2]
    return tuple(METHODS) if chosen is None else chosen


_EX2L = ["algorithm.name=ex2l"]
_SG = ["algorithm.stop_grad=confounder"]
METHODS: dict[str, tuple[str, list[str]]] = {
    "erm": ("ERM", ["algorithm.name=erm"]),
    "erm_2head": ("ERM + confounder head (= eX2L with λ = 0)", ["algorithm.name=erm", "algorithm.conf_weight=1.0"]),
    "groupdro": ("GroupDRO, η = 0.01", ["algorithm.name=groupdro", "algorithm.eta=0.01"]),
    "paper_l0.1": ("eX2L as in the paper: Dice of max-normalised ReLU CAMs, shared backbone, λ = 0.1",
                   [*_EX2L, "algorithm.variant=paper", "algorithm.penalty_weight=0.1"]),
    "paper_l1": ("eX2L paper, λ = 1", [*_EX2L, "algorithm.variant=paper", "algorithm.penalty_weight=1.0"]),
    "paper_sg_l0.1": ("eX2L paper + stop-grad on the confounder CAM + detached confounder CE, λ = 0.1",
                      [*_EX2L, "algorithm.variant=paper", "algorithm.penalty_weight=0.1", *_SG,
                       "algorithm.conf_detach=true"]),
    "paper_dual_l0.1": ("eX2L paper, two backbones, λ = 0.1",
                        [*_EX2L, "algorithm.variant=paper", "algorithm.penalty_weight=0.1",
                         "model.architecture=dual"]),
    "evid_l1": ("evidence penalty (ours), stop-grad + detached confounder CE, λ = 1",
                [*_EX2L, "algorithm.variant=evidence", "algorithm.penalty_weight=1.0", *_SG,
                 "algorithm.conf_detach=true"]),
    "evid_all_l0.1": ("evidence (ours), all classes, stop-grad + detached confounder CE, λ = 0.1",
                      [*_EX2L, "algorithm.variant=evidence", "algorithm.penalty_weight=0.1", *_SG,
                       "algorithm.conf_detach=true", "algorithm.label_cam_classes=all"]),
    "evid_all_l1": ("evidence (ours), all classes, stop-grad + detached confounder CE, λ = 1",
                    [*_EX2L, "algorithm.variant=evidence", "algorithm.penalty_weight=1.0", *_SG,
                     "algorithm.conf_detach=true", "algorithm.label_cam_classes=all"]),
    "evid_all_l1_layer3": ("evidence (ours), all classes, stop-grad + detached confounder CE, λ = 1, CAMs at layer3",
                           [*_EX2L, "algorithm.variant=evidence", "algorithm.penalty_weight=1.0", *_SG,
                            "algorithm.conf_detach=true", "algorithm.label_cam_classes=all",
                            "model.cam_layer=layer3"]),
    "evid_dual_all_l1": ("evidence (ours), all classes, two backbones, stop-grad, λ = 1",
                         [*_EX2L, "algorithm.variant=evidence", "algorithm.penalty_weight=1.0", *_SG,
                          "algorithm.label_cam_classes=all", "model.architecture=dual"]),
}
SEEDS = (0, 1, 2)


def run_dir(root: Path, bench: str, method: str, seed: int) -> Path:
    """The run folder of one configuration."""
    return root / bench / method / f"seed{seed}"


def overrides_for(bench: str, method: str, seed: int, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The ``--set`` overrides of one configuration (on top of the quick preset); ``extra`` last."""
    return [*BASE_OVERRIDES, *BENCHMARKS[bench][1], *METHODS[method][1], f"seed={seed}", *extra]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def measure_run(out: Path, max_samples: int = 800) -> dict[str, Any]:
    """Test-split diagnostics of a finished run: zero-CAM share, CAM mass in the object, decision-level leak."""
    import numpy as np
    import torch

    from analysis.localization import cam_mass_in_mask
    from analysis.probes import leakage
    from ex2l_xai.cam import head_cams
    from ex2l_xai.train import build_datasets, load_run_model

    model, config = load_run_model(out, device="cpu")
    model.eval()
    test = build_datasets(config)["test"]
    n = min(len(test), max_samples)
    idx = np.random.default_rng(0).permutation(len(test))[:n]
    logits, latents, labels, confs, zero, in_mask = [], [], [], [], [], []
    for start in range(0, n, 128):
        batch = [test[int(i)] for i in idx[start : start + 128]]
        x = torch.stack([b["image"] for b in batch])
        y = torch.tensor([b["label"] for b in batch])
        res = head_cams(lambda i: model(i), [model.cam_layers()[0]], x, [y], create_graph=False)
        cam = res.cams[0]
        logits.append(res.output.label.detach())
        latents.append(res.output.latent.detach())
        labels.append(y)
        confs.append(torch.tensor([b["confounder"] for b in batch]))
        zero.append(cam.flatten(1).amax(1) <= 0)
        if "mask" in batch[0]:
            in_mask.append(cam_mass_in_mask(cam, torch.stack([b["mask"] for b in batch])))
    lg, lt = torch.cat(logits).numpy(), torch.cat(latents).numpy()
    lab, cf = torch.cat(labels).numpy(), torch.cat(confs).numpy()
    leak = leakage(lt, lab, cf, logits=lg, cv=3, seed=0)
    mass = torch.cat(in_mask) if in_mask else None
    return {
        "n": int(n),
        "zero_cam_share": float(torch.cat(zero).float().mean()),
        "cam_in_mask": None if mass is None else float(np.nanmean(mass.numpy())),
        "logit_leak": leak.get("logit_leak"),
        "within_label_acc": leak.get("within_label_acc"),
        "chance": leak.get("within_label_chance"),
    }


def _train_one(
    bench: str, method: str, seed: int, root: str, threads: int, extra: tuple[str, ...] = (), device: str = "cpu"
) -> tuple[str, float, str]:
    """Worker: train (or resume / skip) one configuration, then measure it."""
    import torch

    torch.set_num_threads(threads)
    from ex2l_xai.config import load_config
    from ex2l_xai.train import train

    out = run_dir(Path(root), bench, method, seed)
    t0 = time.time()
    config = load_config(BASE_PRESET, overrides_for(bench, method, seed, extra))
    config.train.device = device
    train(config, out, quiet=True)
    metrics_file = out / "study_metrics.json"
    if not metrics_file.exists():
        _atomic_json(metrics_file, measure_run(out))
    return f"{bench}/{method}/seed{seed}", time.time() - t0, ""


def cmd_run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    root = Path(args.root)
    jobs = [  # seed-major: a sweep cut short still covers every configuration
        (b, m, s)
        for s in args.seeds
        for b in BENCHMARKS
        for m in methods_of(b)
        if (not args.only or re.search(args.only, f"{b}/{m}"))
        and not ((run_dir(root, b, m, s) / "done").exists() and (run_dir(root, b, m, s) / "study_metrics.json").exists())
    ]
    log.info("%d configurations to run in %s with %d processes", len(jobs), root, args.jobs)
    t0 = time.time()
    failures = 0
    ctx = multiprocessing.get_context("spawn" if args.device != "cpu" else "fork")  # no fork after CUDA init
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(_train_one, b, m, s, str(root), args.threads, tuple(args.set), args.device): (b, m, s) for b, m, s in jobs}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="study", disable=args.quiet):
            try:
                name, secs, _ = fut.result()
                log.info("%s done in %.0f s", name, secs)
            except Exception as exc:  # keep going; the run folder resumes next time
                failures += 1
                log.error("%s failed: %s", "/".join(map(str, futures[fut])), exc)
    log.info("study: %d runs in %.0f s, %d failed", len(jobs), time.time() - t0, failures)
    return 1 if failures else 0


# ---- aggregation --------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(root: Path, seeds: tuple[int, ...]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per benchmark and method, one record per finished seed."""
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for b in BENCHMARKS:
        for m in methods_of(b):
            for s in seeds:
                out = run_dir(root, b, m, s)
                if not (out / "done").exists():
                    continue
                res = json.loads((out / "results.json").read_text())
                recs = _read_jsonl(out / "metrics.jsonl")
                oracle = max(recs, key=lambda r: (r["oracle_val"]["worst_group_acc"], -r["epoch"])) if recs and "oracle_val" in recs[0] else None
                sel = next((r for r in recs if r["epoch"] == res["selected_epoch"]), recs[-1])
                extra = json.loads((out / "study_metrics.json").read_text()) if (out / "study_metrics.json").exists() else {}
                table.setdefault(b, {}).setdefault(m, []).append(
                    {
                        "seed": s,
                        "val_wga": res["val"]["worst_group_acc"],
                        "test_aa": res["test"]["avg_acc"],
                        "test_wga": res["test"]["worst_group_acc"],
                        "oracle_val_wga": oracle["oracle_val"]["worst_group_acc"] if oracle else None,
                        "oracle_test_aa": oracle["test"]["avg_acc"] if oracle else None,
                        "oracle_test_wga": oracle["test"]["worst_group_acc"] if oracle else None,
                        "train_zero_cam": (sel.get("stats") or {}).get("zero_cam_share"),
                        "train_penalty": (sel.get("stats") or {}).get("penalty_mean"),
                        **{f"m_{k}": v for k, v in extra.items()},
                    }
                )
    return table


def _ms(values: list[Any], pct: bool = True, digits: int = 1) -> str:
    """``mean ± std`` over seeds (percent by default); ``–`` where nothing was measured."""
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "–"
    f = 100.0 if pct else 1.0
    mean = statistics.fmean(vals) * f
    sd = statistics.stdev(vals) * f if len(vals) > 1 else 0.0
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _pct(value: float) -> str:
    return "–" if value != value else f"{100 * value:.0f}"


def _mean(values: list[Any]) -> float:
    vals = [v for v in values if v is not None and v == v]
    return statistics.fmean(vals) if vals else float("nan")


def choose(
    table: dict[str, dict[str, list[dict[str, Any]]]], key: str, benches: tuple[str, ...] | None = None
) -> str | None:
    """The eX2L variant with the best mean ``key`` (a validation metric) over ``benches`` (default: all)."""
    benches = tuple(BENCHMARKS) if benches is None else benches
    scores: dict[str, float] = {}
    for m in METHODS:
        if "algorithm.name=ex2l" not in METHODS[m][1] or any(m not in methods_of(b) for b in benches):
            continue
        per_bench = [_mean([r[key] for r in table.get(b, {}).get(m, [])]) for b in benches]
        if all(v == v for v in per_bench):  # no NaN: every benchmark has runs
            scores[m] = statistics.fmean(per_bench)
    return max(scores, key=lambda m: scores[m]) if scores else None


def render(table: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """The markdown tables of docs/results.md."""
    lines: list[str] = []
    val_choice, oracle_choice = choose(table, "val_wga"), choose(table, "oracle_val_wga")
    big = tuple(b for b in BENCHMARKS if b.endswith("_big"))
    big_val, big_oracle = choose(table, "val_wga", big), choose(table, "oracle_val_wga", big)
    lines.append(f"eX2L variant chosen on training-distribution validation (mean val WGA over benchmarks): "
                 f"**{val_choice}**; oracle choice (on `oracle_val`, test distribution, disjoint from test): "
                 f"**{oracle_choice}**.\n")
    lines.append(f"On the calibrated benchmarks alone: validation choice **{big_val}**, oracle choice "
                 f"**{big_oracle}**.\n")
    for b, (desc, _, _) in BENCHMARKS.items():
        rows = table.get(b, {})
        if not rows:
            continue
        lines.append(f"\n#### {b}: {desc}\n")
        lines.append("| method | seeds | val WGA | test AA | test WGA | oracle: test AA | oracle: test WGA "
                     "| zero label CAMs (train) | zero label CAMs (test) | CAM mass in object | decision leak (chance) "
                     "| penalty (train) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m, (mdesc, _) in METHODS.items():
            recs = rows.get(m) if m in methods_of(b) else None
            if not recs:
                continue
            tag = " ← val choice" if m == (big_val if b in big else val_choice) else ""
            chance = _mean([r.get("m_chance") for r in recs])
            lines.append(
                f"| `{m}`{tag}: {mdesc} | {len(recs)} | {_ms([r['val_wga'] for r in recs])} "
                f"| {_ms([r['test_aa'] for r in recs])} | **{_ms([r['test_wga'] for r in recs])}** "
                f"| {_ms([r['oracle_test_aa'] for r in recs])} | {_ms([r['oracle_test_wga'] for r in recs])} "
                f"| {_ms([r['train_zero_cam'] for r in recs])} | {_ms([r.get('m_zero_cam_share') for r in recs])} "
                f"| {_ms([r.get('m_cam_in_mask') for r in recs])} "
                f"| {_ms([r.get('m_logit_leak') for r in recs])} ({_pct(chance)}) "
                f"| {_ms([r.get('train_penalty') for r in recs], pct=False, digits=3)} |"
            )
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- study:begin -->", "<!-- study:end -->"


def cmd_report(args: argparse.Namespace) -> int:
    root = Path(args.root)
    table = collect(root, tuple(args.seeds))
    text = render(table)
    _atomic_json(root / "summary.json", table)
    if args.md:
        md = Path(args.md)
        doc = md.read_text() if md.exists() else f"{BEGIN}\n{END}\n"
        if BEGIN not in doc or END not in doc:
            doc += f"\n{BEGIN}\n{END}\n"
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        tmp = md.with_suffix(".tmp")
        tmp.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
        os.replace(tmp, md)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "all"):
        p = sub.add_parser(name)
        p.add_argument("--root", default=str(ROOT / "runs" / "study"), help="where the run folders live")
        p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
        p.add_argument("--quiet", action="store_true")
        if name in ("run", "all"):
            p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
            p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per run")
            p.add_argument("--only", default="", help="regex on '<benchmark>/<method>'")
            p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (tests: tiny runs)")
            p.add_argument("--device", default="cpu", help="train.device of every run (cpu, cuda, auto)")
        if name in ("report", "all"):
            p.add_argument("--md", default="", help="rewrite the study section of this markdown file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "report":
        return cmd_report(args)
    failed = cmd_run(args)  # all: train what is missing, then write the tables (of what finished)
    return cmd_report(args) or failed


if __name__ == "__main__":
    sys.exit(main())
