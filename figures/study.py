"""The eX2L study: which settings of the penalty work, measured on the built-in benchmark (docs/results.md).

Two regimes, each its own sweep, tables and section of docs/results.md:

* ``pretrained`` (the default; the paper's regime): EfficientNet-Lite0 with ImageNet weights (the ``pretrained``
  preset: 128 px, stem to layer3 frozen and cached, Adam 1e-4, batch 32, 4 epochs), ERM, GroupDRO, the eX2L
  variants and the baselines of DomainBed and SubpopBench;
* ``scratch``: the first study, a small CNN trained from scratch (the ``quick`` preset's network, 64 px).

Every configuration is a run folder ``<root>/<benchmark>/<method>/seed<k>`` trained with ``ex2l_xai.train``;
a folder with ``done`` is skipped, an unfinished one resumes, so the sweep can be stopped and restarted at
will. Methods that start from another run (``model.init_from``: Singh et al.'s form starts from two-head ERM)
run in a second wave, after what they start from. After training, each run gets ``study_metrics.json``: on the
test split, the share of all-zero label CAMs, the share of label-CAM mass inside the object mask, the overlap of
the label and confounder CAMs, and the decision-level leak (a linear probe that predicts the background from the
label logits within each label; analysis.probes).

    python figures/study.py all --jobs 2 --threads 1 --md docs/results.md   # train (resumable), then the tables
    python figures/study.py run --jobs 2              # train every configuration (resumable), progress bars
    python figures/study.py report --md docs/results.md   # aggregate; rewrite the regime's tables in results.md
    python figures/study.py run --only m2m_hard --seeds 0   # a subset
    python figures/study.py all --regime scratch --md docs/results.md   # the from-scratch study

Model selection, as DomainBed: within a run the epoch is chosen on the training-distribution validation split
(``val``: worst-group accuracy, ties broken by the lower validation cross-entropy); the *oracle* column
re-chooses the epoch on ``oracle_val``, a split drawn from the test environments and disjoint from test. eX2L's
default is the variant with the best mean validation worst-group accuracy (training distribution) over the
regime's ``choose_on`` benchmarks (all of them for ``scratch``; m2m_hard, where every variant runs, for
``pretrained``), ties broken by the validation cross-entropy; the oracle choice is reported beside it, labelled
as such. Test numbers never choose anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ex2l_xai.fileio import atomic_write, atomic_write_json  # noqa: E402
from ex2l_xai.launch import LAUNCHERS  # noqa: E402

log = logging.getLogger("study")


@dataclass
class Regime:
    """One study: its base preset and overrides, benchmarks (name -> (description, overrides, methods or None
    for all)), methods (name -> (description, overrides)), and which methods start from which (``init_from``:
    method -> the method of the same benchmark and seed whose run folder it starts from)."""

    name: str
    title: str
    preset: str
    base: list[str]
    benchmarks: dict[str, tuple[str, list[str], tuple[str, ...] | None]]
    methods: dict[str, tuple[str, list[str]]]
    init_from: dict[str, str] = field(default_factory=dict)
    lambda_sweep: tuple[tuple[str, float], ...] = ()
    #: the benchmarks on which eX2L's default variant is chosen (None: all; a variant must have run on each)
    choose_on: tuple[str, ...] | None = None


# ---- the from-scratch study (the first one) ------------------------------------------------------------------
# The study's benchmark size and training budget, pinned here so later changes of the quick preset cannot
# change it: 64 px images, 300 images per class and training environment (1920 train images after carving
# validation), small CNN width 16 with one backbone unless a method says otherwise, Adam 3e-3, cosine, 25 epochs.
_SCRATCH_BASE: list[str] = [
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
# The ``_big`` ones are the calibrated benchmark: objects 1.5x larger (object_scale 1.5), so the shape is
# learnable from scratch as dogs are for a pretrained ResNet on Spawrious; the plain ones keep the default objects.
_BIG = ["data.options.object_scale=1.5"]
_CALIBRATED_METHODS = ("erm", "erm_2head", "groupdro", "paper_l0.1", "paper_sg_l0.1", "paper_dual_l0.1",
                       "evid_all_l0.1", "evid_all_l1", "evid_dual_all_l1")
_M2M = ["data.options.challenge=m2m_hard"]
_O2O = ["data.options.challenge=o2o_hard"]
_MIN5 = [*_M2M, "data.options.minority_fraction=0.05"]
_EX2L = ["algorithm.name=ex2l"]
_SG = ["algorithm.stop_grad=confounder"]
SCRATCH = Regime(
    name="scratch",
    title="From scratch: a small CNN on the built-in benchmark",
    preset="quick",
    base=_SCRATCH_BASE,
    benchmarks={
        "m2m_hard": ("synthetic m2m_hard, 100 % spurious (Spawrious' table)", _M2M, None),
        "o2o_hard": ("synthetic o2o_hard (97 % / 87 % spurious)", _O2O, None),
        "m2m_hard_min5": ("synthetic m2m_hard with minority_fraction 0.05", _MIN5, None),
        "m2m_hard_big": ("calibrated: m2m_hard, 100 % spurious, object_scale 1.5", [*_M2M, *_BIG],
                         _CALIBRATED_METHODS),
        "o2o_hard_big": ("calibrated: o2o_hard, object_scale 1.5", [*_O2O, *_BIG], _CALIBRATED_METHODS),
        "m2m_hard_min5_big": ("calibrated: m2m_hard, minority_fraction 0.05, object_scale 1.5", [*_MIN5, *_BIG],
                              _CALIBRATED_METHODS),
    },
    methods={
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
        "evid_all_l1_layer3": ("evidence (ours), all classes, stop-grad + detached confounder CE, λ = 1, CAMs at "
                               "layer3",
                               [*_EX2L, "algorithm.variant=evidence", "algorithm.penalty_weight=1.0", *_SG,
                                "algorithm.conf_detach=true", "algorithm.label_cam_classes=all",
                                "model.cam_layer=layer3"]),
        "evid_dual_all_l1": ("evidence (ours), all classes, two backbones, stop-grad, λ = 1",
                             [*_EX2L, "algorithm.variant=evidence", "algorithm.penalty_weight=1.0", *_SG,
                              "algorithm.label_cam_classes=all", "model.architecture=dual"]),
    },
)

# ---- the pretrained regime -----------------------------------------------------------------------------------
# The `pretrained` preset as it is, pinned here: EfficientNet-Lite0 (ImageNet), 128 px, frozen and cached through
# layer3, Adam 1e-4, batch 32, 4 epochs, 300 images per class and training environment, 200 test images per class.
_PRE_BASE: list[str] = [
    "model.backbone=efficientnet_lite0",
    "model.pretrained=imagenet",
    "model.freeze=layer3",
    "model.cache_frozen=true",
    "model.cam_layer=layer4",
    "data.options.image_size=128",
    "data.options.per_group=300",
    "data.options.test_per_group=200",
    "data.batch_size=32",
    "optim.name=adam",
    "optim.lr=0.0001",
    "schedule.name=none",
    "train.epochs=4",
]
_DUAL = ["model.architecture=dual"]
_ONE = ["model.architecture=shared"]  # methods without a confounder head have one backbone anyway


def _paper(lam: float, *extra: str) -> list[str]:
    return [*_EX2L, "algorithm.variant=paper", f"algorithm.penalty_weight={lam}", *_DUAL, *extra]


# Every variant and baseline runs on m2m_hard, the benchmark eX2L's default is chosen on. o2o_hard and the minority
# variant get the headline methods plus one representative of each kind of eX2L variant the issue names: the
# paper's form with one shared backbone, a stronger λ, the evidence penalty, Singh et al.'s form with its control,
# and the penalty at an earlier block. Left out there, for the 2-core CPU's budget: the rest of the λ sweep, the
# warm-up, the input-gradient mask (20 minutes a run without the prefix cache) and the baselines.
_HEADLINE = ("erm", "erm_2head", "groupdro", "paper_dual_l0.1")
_CORE = (*_HEADLINE, "paper_l0.1", "paper_dual_l1", "evid_dual_all_l0.1", "singh_dual", "erm_2head_cont",
         "gradmask_l3")
PRETRAINED = Regime(
    name="pretrained",
    title="The paper's regime: an ImageNet-pretrained backbone on the built-in benchmark",
    preset="pretrained",
    base=_PRE_BASE,
    benchmarks={
        "m2m_hard": ("synthetic m2m_hard, 100 % spurious (Spawrious' table)", _M2M, None),
        "o2o_hard": ("synthetic o2o_hard (97 % / 87 % spurious)", _O2O, _CORE),
        "m2m_hard_min5": ("synthetic m2m_hard with minority_fraction 0.05", _MIN5, _CORE),
    },
    methods={
        "erm": ("ERM", ["algorithm.name=erm", *_ONE]),
        "erm_2head": ("ERM + confounder head on its own backbone (= eX2L dual with λ = 0)",
                      ["algorithm.name=erm", "algorithm.conf_weight=1.0", *_DUAL]),
        "groupdro": ("GroupDRO, η = 0.01", ["algorithm.name=groupdro", "algorithm.eta=0.01", *_ONE]),
        "paper_dual_l0.1": ("eX2L as in the paper: Dice of max-normalised ReLU CAMs, two backbones, λ = 0.1",
                            _paper(0.1)),
        "paper_l0.1": ("eX2L paper, one shared backbone, λ = 0.1",
                       [*_EX2L, "algorithm.variant=paper", "algorithm.penalty_weight=0.1", *_ONE]),
        "paper_dual_l0.01": ("eX2L paper, two backbones, λ = 0.01", _paper(0.01)),
        "paper_dual_l1": ("eX2L paper, two backbones, λ = 1", _paper(1.0)),
        "paper_dual_l10": ("eX2L paper, two backbones, λ = 10", _paper(10.0)),
        "paper_dual_l1_warm": ("eX2L paper, two backbones, λ = 1 reached by a linear warm-up over 2 epochs",
                               _paper(1.0, "algorithm.warmup_epochs=2")),
        "evid_dual_all_l0.1": ("evidence (ours): label evidence in the confounder region, all classes, two "
                               "backbones, stop-grad, λ = 0.1",
                               [*_EX2L, "algorithm.variant=evidence", "algorithm.penalty_weight=0.1", *_SG,
                                "algorithm.label_cam_classes=all", *_DUAL]),
        "singh_dual": ("Singh et al. 2020: product overlap of min-max signed CAMs (0.1) + anchor to the starting "
                       "model (0.01), started from two-head ERM",
                       [*_EX2L, "algorithm.variant=paper", "algorithm.similarity=product", "algorithm.norm=minmax",
                        "algorithm.cam_relu=false", "algorithm.penalty_weight=0.1", "algorithm.anchor_weight=0.01",
                        *_DUAL]),
        "erm_2head_cont": ("two-head ERM continued for 4 more epochs from `erm_2head` (Singh's budget without its "
                           "penalty: the control of `singh_dual`)",
                           ["algorithm.name=erm", "algorithm.conf_weight=1.0", *_DUAL]),
        "gradmask_l3": ("gradmask: share of the label's layer3 saliency (8×8) in the confounder region, λ = 1",
                        [*_EX2L, "algorithm.variant=gradmask", "algorithm.grad_at=layer3",
                         "algorithm.penalty_weight=1.0", *_DUAL]),
        "gradmask_in": ("gradmask at the input pixels (RRR-style), λ = 1",
                        [*_EX2L, "algorithm.variant=gradmask", "algorithm.grad_at=input",
                         "algorithm.penalty_weight=1.0", *_DUAL]),
        "irm": ("IRM (DomainBed defaults)", ["algorithm.name=irm", *_ONE]),
        "vrex": ("VREx (DomainBed defaults)", ["algorithm.name=vrex", *_ONE]),
        "coral": ("CORAL (DomainBed defaults)", ["algorithm.name=coral", *_ONE]),
        "mmd": ("MMD, Gaussian kernel (DomainBed defaults)", ["algorithm.name=mmd", *_ONE]),
        "dann": ("DANN, alternating discriminator (DomainBed defaults)", ["algorithm.name=dann", *_ONE]),
        "mixup": ("Mixup between environments (DomainBed defaults; no prefix cache)",
                  ["algorithm.name=mixup", *_ONE, "model.cache_frozen=false"]),
        "jtt": ("JTT (SubpopBench defaults): ERM identification stage, then the error set upweighted",
                ["algorithm.name=jtt", *_ONE]),
        "dfr": ("DFR (SubpopBench): ERM, then the last layer refit on group-balanced half of val",
                ["algorithm.name=dfr", *_ONE]),
    },
    init_from={"singh_dual": "erm_2head", "erm_2head_cont": "erm_2head"},
    choose_on=("m2m_hard",),  # the one benchmark every variant runs on
    lambda_sweep=(("erm_2head", 0.0), ("paper_dual_l0.01", 0.01), ("paper_dual_l0.1", 0.1), ("paper_dual_l1", 1.0),
                  ("paper_dual_l10", 10.0)),
)

REGIMES = {r.name: r for r in (PRETRAINED, SCRATCH)}
SEEDS = (0, 1, 2)
# the first study's names, kept for callers of the scratch regime
BASE_PRESET, BASE_OVERRIDES = SCRATCH.preset, SCRATCH.base
BENCHMARKS, METHODS = SCRATCH.benchmarks, SCRATCH.methods


def methods_of(bench: str, regime: Regime = SCRATCH) -> tuple[str, ...]:
    """The methods run on benchmark ``bench`` of ``regime``."""
    chosen = regime.benchmarks[bench][2]
    return tuple(regime.methods) if chosen is None else chosen


def run_dir(root: Path, bench: str, method: str, seed: int) -> Path:
    """The run folder of one configuration."""
    return root / bench / method / f"seed{seed}"


def overrides_for(
    bench: str, method: str, seed: int, extra: list[str] | tuple[str, ...] = (), regime: Regime = SCRATCH,
    root: Path | None = None,
) -> list[str]:
    """The ``--set`` overrides of one configuration (on top of the regime's preset); ``extra`` last. A method
    that starts from another run gets ``model.init_from`` pointing at that run's folder under ``root``."""
    start = []
    if method in regime.init_from:
        if root is None:
            raise ValueError(f"{method} starts from {regime.init_from[method]}: pass the study root")
        start = [f"model.init_from={run_dir(root, bench, regime.init_from[method], seed)}"]
    return [*regime.base, *regime.benchmarks[bench][1], *regime.methods[method][1], *start, f"seed={seed}", *extra]


def measure_run(out: Path, max_samples: int = 800) -> dict[str, Any]:
    """Test-split diagnostics of a finished run: zero-CAM share, CAM mass in the object, label-confounder CAM
    overlap (Dice of max-normalised ReLU CAMs, where the model has a confounder head), decision-level leak."""
    import numpy as np
    import torch

    from analysis.localization import cam_mass_in_mask
    from analysis.probes import leakage
    from ex2l_xai.cam import head_cams
    from ex2l_xai.penalties import similarity
    from ex2l_xai.train import build_datasets, load_run_model

    model, config = load_run_model(out, device="cpu")
    model.eval()
    test = build_datasets(config)["test"]
    n = min(len(test), max_samples)
    idx = np.random.default_rng(0).permutation(len(test))[:n]
    has_conf = model.conf_head is not None
    logits, latents, labels, confs, zero, in_mask, overlap = [], [], [], [], [], [], []
    for start in range(0, n, 128):
        batch = [test[int(i)] for i in idx[start : start + 128]]
        x = torch.stack([b["image"] for b in batch])
        y = torch.tensor([b["label"] for b in batch])
        c = torch.tensor([b["confounder"] for b in batch])
        layers = model.cam_layers() if has_conf else model.cam_layers()[:1]
        res = head_cams(model, layers, x, [y, c] if has_conf else [y], create_graph=False)
        cam = res.cams[0]
        assert cam is not None
        logits.append(res.output.label.detach())
        latents.append(res.output.latent.detach())
        labels.append(y)
        confs.append(c)
        zero.append(cam.flatten(1).amax(1) <= 0)
        if has_conf:
            overlap.append(similarity(cam, res.cams[1], "dice", "max"))
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
        "cam_overlap": float(torch.cat(overlap).mean()) if overlap else None,
        "logit_leak": leak.get("logit_leak"),
        "within_label_acc": leak.get("within_label_acc"),
        "chance": leak.get("within_label_chance"),
    }


def _train_one(
    regime: str, bench: str, method: str, seed: int, root: str, threads: int, extra: tuple[str, ...] = (),
    device: str = "cpu",
) -> tuple[str, float, str]:
    """Worker: train (or resume / skip) one configuration, then measure it."""
    import torch

    torch.set_num_threads(threads)
    from ex2l_xai.config import load_config
    from ex2l_xai.train import train

    r = REGIMES[regime]
    out = run_dir(Path(root), bench, method, seed)
    t0 = time.time()
    config = load_config(r.preset, overrides_for(bench, method, seed, extra, r, Path(root)))
    config.train.device = device
    train(config, out, quiet=True)
    metrics_file = out / "study_metrics.json"
    if not metrics_file.exists():
        atomic_write_json(metrics_file, measure_run(out), indent=1)
    return f"{bench}/{method}/seed{seed}", time.time() - t0, ""


def _finished(root: Path, bench: str, method: str, seed: int) -> bool:
    out = run_dir(root, bench, method, seed)
    return (out / "done").exists() and (out / "study_metrics.json").exists()


def jobs_of(regime: Regime, root: Path, seeds: list[int], only: str = "") -> list[list[tuple[str, str, int]]]:
    """The configurations still to run, in waves: a method that starts from another run comes after it.
    Seed-major within a wave, so a sweep cut short still covers every configuration."""
    todo = [
        (b, m, s)
        for s in seeds
        for b in regime.benchmarks
        for m in methods_of(b, regime)
        if (not only or re.search(only, f"{b}/{m}")) and not _finished(root, b, m, s)
    ]
    first = [j for j in todo if j[1] not in regime.init_from]
    second = [j for j in todo if j[1] in regime.init_from]
    for b, m, s in second:  # what a second-wave run starts from must run too, even outside --only
        dep = (b, regime.init_from[m], s)
        if dep not in first and not _finished(root, *dep):
            first.append(dep)
    return [w for w in (first, second) if w]


def cmd_run(args: argparse.Namespace) -> int:
    """Train what is missing, wave by wave, through the chosen launcher (ex2l_xai.launch): local processes, or
    submitit (slurm, or its local/debug executors). Failed runs are logged with their log files; they resume at
    the next call."""
    from ex2l_xai.launch import Job, LaunchOptions, launch

    regime = REGIMES[args.regime]
    root = Path(args.root)
    waves = jobs_of(regime, root, args.seeds, args.only)
    total = sum(len(w) for w in waves)
    options = LaunchOptions(
        launcher=args.launcher,
        workers=args.jobs,
        partition=args.partition,
        gpus_per_job=args.gpus,
        tasks_per_job=args.tasks_per_job,
        cpus_per_task=args.cpus,
        mem_gb=args.mem_gb,
        time_min=args.time,
        array_parallelism=args.array_parallelism,
        slurm_args=dict(kv.split("=", 1) for kv in args.slurm_arg),
        start_method="spawn" if args.device != "cpu" else "fork",  # no fork after CUDA init
    )
    jobs = [
        [
            Job(f"{b}/{m}/seed{s}", _train_one,
                (regime.name, b, m, s, str(root), args.threads, tuple(args.set), args.device),
                skip_if=str(run_dir(root, b, m, s) / "study_metrics.json"))
            for b, m, s in wave
        ]
        for wave in waves
    ]
    log.info("%d configurations to run in %s through the %s launcher", total, root, args.launcher)
    t0 = time.time()
    report = launch(jobs, options, args.log_dir or root / "logs", name=f"study-{regime.name}",
                    by_value=[sys.modules[_train_one.__module__]])
    for f in report.failed:  # the run folder resumes next time
        log.error("%s failed: %s (log: %s)", f.name, f.error, f.log)
    log.info("study: %d runs in %.0f s, %d failed", total, time.time() - t0, len(report.failed))
    return 1 if report.failed else 0


# ---- aggregation --------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(root: Path, seeds: tuple[int, ...], regime: Regime = SCRATCH) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per benchmark and method, one record per finished seed."""
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for b in regime.benchmarks:
        for m in methods_of(b, regime):
            for s in seeds:
                out = run_dir(root, b, m, s)
                if not (out / "done").exists():
                    continue
                res = json.loads((out / "results.json").read_text())
                recs = [r for r in _read_jsonl(out / "metrics.jsonl") if "val" in r]
                oracle = (max(recs, key=lambda r: (r["oracle_val"]["worst_group_acc"], -r["epoch"]))
                          if recs and "oracle_val" in recs[0] else None)
                sel = next((r for r in recs if r["epoch"] == res["selected_epoch"]), recs[-1])
                extra = json.loads((out / "study_metrics.json").read_text()) if (out / "study_metrics.json").exists() else {}
                table.setdefault(b, {}).setdefault(m, []).append(
                    {
                        "seed": s,
                        "selected_epoch": res["selected_epoch"],
                        "val_wga": res["val"]["worst_group_acc"],
                        "val_nll": res["val"].get("nll"),
                        "test_aa": res["test"]["avg_acc"],
                        "test_wga": res["test"]["worst_group_acc"],
                        "last_test_aa": recs[-1]["test"]["avg_acc"],
                        "last_test_wga": recs[-1]["test"]["worst_group_acc"],
                        "oracle_val_wga": oracle["oracle_val"]["worst_group_acc"] if oracle else None,
                        "oracle_test_aa": oracle["test"]["avg_acc"] if oracle else None,
                        "oracle_test_wga": oracle["test"]["worst_group_acc"] if oracle else None,
                        "train_zero_cam": (sel.get("stats") or {}).get("zero_cam_share"),
                        "train_penalty": (sel.get("stats") or {}).get("penalty_mean"),
                        "wall_seconds": res.get("wall_seconds"),
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
    table: dict[str, dict[str, list[dict[str, Any]]]], key: str, benches: tuple[str, ...] | None = None,
    regime: Regime = SCRATCH,
) -> str | None:
    """The eX2L variant with the best mean ``key`` (a validation metric) over ``benches`` (default: all). For the
    training-distribution choice (``val_wga``) ties are broken as within a run: by the lower mean validation
    cross-entropy (``val_nll``, where recorded); remaining ties go to the variant listed first (the paper's own
    setting comes first)."""
    benches = tuple(regime.benchmarks) if benches is None else benches
    scores: dict[str, tuple[float, float]] = {}
    for m in regime.methods:
        if "algorithm.name=ex2l" not in regime.methods[m][1] or any(m not in methods_of(b, regime) for b in benches):
            continue
        per_bench = [_mean([r[key] for r in table.get(b, {}).get(m, [])]) for b in benches]
        nll = [_mean([r.get("val_nll") for r in table.get(b, {}).get(m, [])]) for b in benches]
        if all(v == v for v in per_bench):  # no NaN: every benchmark has runs
            tie = -statistics.fmean(nll) if key == "val_wga" and all(v == v for v in nll) else 0.0
            scores[m] = (statistics.fmean(per_bench), tie)
    return max(scores, key=lambda m: scores[m]) if scores else None


def _row(m: str, mdesc: str, recs: list[dict[str, Any]], tag: str) -> str:
    chance = _mean([r.get("m_chance") for r in recs])
    return (
        f"| `{m}`{tag}: {mdesc} | {len(recs)} | {_ms([r['val_wga'] for r in recs])} "
        f"| {_ms([r['test_aa'] for r in recs])} | **{_ms([r['test_wga'] for r in recs])}** "
        f"| {_ms([r.get('last_test_wga') for r in recs])} "
        f"| {_ms([r['oracle_test_aa'] for r in recs])} | {_ms([r['oracle_test_wga'] for r in recs])} "
        f"| {_ms([r['train_zero_cam'] for r in recs])} | {_ms([r.get('m_zero_cam_share') for r in recs])} "
        f"| {_ms([r.get('m_cam_in_mask') for r in recs])} "
        f"| {_ms([r.get('m_cam_overlap') for r in recs], pct=False, digits=2)} "
        f"| {_ms([r.get('m_logit_leak') for r in recs])} ({_pct(chance)}) "
        f"| {_ms([r.get('train_penalty') for r in recs], pct=False, digits=3)} |"
    )


def render(table: dict[str, dict[str, list[dict[str, Any]]]], regime: Regime = SCRATCH) -> str:
    """The markdown tables of one regime's section of docs/results.md."""
    lines: list[str] = []
    on = regime.choose_on
    val_choice, oracle_choice = choose(table, "val_wga", on, regime), choose(table, "oracle_val_wga", on, regime)
    big = tuple(b for b in regime.benchmarks if b.endswith("_big"))
    where = "the benchmarks" if on is None else ", ".join(on)
    lines.append(f"eX2L variant chosen on training-distribution validation (mean val WGA over {where}, "
                 f"ties broken by the lower mean val cross-entropy): **{val_choice}**; oracle choice (on "
                 f"`oracle_val`, test distribution, disjoint from test): **{oracle_choice}**.\n")
    big_val = None
    if big:
        big_val, big_oracle = choose(table, "val_wga", big, regime), choose(table, "oracle_val_wga", big, regime)
        lines.append(f"On the calibrated benchmarks alone: validation choice **{big_val}**, oracle choice "
                     f"**{big_oracle}**.\n")
    for b, (desc, _, _) in regime.benchmarks.items():
        rows = table.get(b, {})
        if not rows:
            continue
        lines.append(f"\n#### {b}: {desc}\n")
        lines.append("| method | seeds | val WGA | test AA | test WGA | last epoch: test WGA | oracle: test AA "
                     "| oracle: test WGA | zero label CAMs (train) | zero label CAMs (test) | CAM mass in object "
                     "| label–confounder CAM overlap (test) | decision leak (chance) | penalty (train) |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m, (mdesc, _) in regime.methods.items():
            recs = rows.get(m) if m in methods_of(b, regime) else None
            if recs:
                tag = " ← val choice" if m == (big_val if b in big else val_choice) else ""
                lines.append(_row(m, mdesc, recs, tag))
    if regime.lambda_sweep:
        lines.append(mechanism_table(table, regime))
    return "\n".join(lines) + "\n"


def mechanism_table(table: dict[str, dict[str, list[dict[str, Any]]]], regime: Regime) -> str:
    """Per λ of the paper's penalty (two backbones; λ = 0 is two-head ERM): does the penalty move what it claims
    to move? Label–confounder CAM overlap, decision-level leak, zero-CAM share and WGA, per benchmark."""
    lines = ["\n#### Mechanism: what λ moves (the paper's penalty, two backbones; λ = 0 is two-head ERM)\n",
             "| benchmark | λ | seeds | CAM overlap (test) | penalty (train) | decision leak | zero label CAMs (test) "
             "| CAM mass in object | test AA | test WGA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in regime.benchmarks:
        for m, lam in regime.lambda_sweep:
            recs = table.get(b, {}).get(m)
            if not recs:
                continue
            lines.append(
                f"| {b} | {lam:g} | {len(recs)} | {_ms([r.get('m_cam_overlap') for r in recs], pct=False, digits=2)} "
                f"| {_ms([r.get('train_penalty') for r in recs], pct=False, digits=3)} "
                f"| {_ms([r.get('m_logit_leak') for r in recs])} | {_ms([r.get('m_zero_cam_share') for r in recs])} "
                f"| {_ms([r.get('m_cam_in_mask') for r in recs])} | {_ms([r['test_aa'] for r in recs])} "
                f"| **{_ms([r['test_wga'] for r in recs])}** |"
            )
    return "\n".join(lines)


def markers(regime: Regime) -> tuple[str, str]:
    """The comments around a regime's tables in results.md (the first study kept its original ones)."""
    if regime is SCRATCH:
        return "<!-- study:begin -->", "<!-- study:end -->"
    return f"<!-- study:{regime.name}:begin -->", f"<!-- study:{regime.name}:end -->"


def cmd_report(args: argparse.Namespace) -> int:
    regime = REGIMES[args.regime]
    root = Path(args.root)
    table = collect(root, tuple(args.seeds), regime)
    text = render(table, regime)
    atomic_write_json(root / "summary.json", table, indent=1)
    if args.md:
        begin, end = markers(regime)
        md = Path(args.md)
        doc = md.read_text() if md.exists() else f"{begin}\n{end}\n"
        if begin not in doc or end not in doc:
            doc += f"\n{begin}\n{end}\n"
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        atomic_write(md, f"{head}{begin}\n{text}{end}{tail}")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("run", "report", "all"):
        p = sub.add_parser(name)
        p.add_argument("--regime", choices=sorted(REGIMES), default="pretrained", help="which study (default pretrained)")
        p.add_argument("--root", default=None, help="where the run folders live (default runs/study/<regime>)")
        p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
        p.add_argument("--quiet", action="store_true")
        if name in ("run", "all"):
            p.add_argument("--jobs", type=int, default=1, help="runs in parallel (local launcher: processes)")
            p.add_argument("--threads", type=int, default=1, help="torch threads per run")
            p.add_argument("--only", default="", help="regex on '<benchmark>/<method>'")
            p.add_argument("--set", nargs="*", default=[], help="extra overrides for every run (tests: tiny runs)")
            p.add_argument("--device", default="cpu", help="train.device of every run (cpu, cuda, auto)")
            g = p.add_argument_group("launcher (ex2l_xai.launch; see docs/scaling.md)")
            g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                           help="local processes (default), slurm (submitit), submitit-local or debug")
            g.add_argument("--log-dir", default=None, help="job logs (default <root>/logs)")
            g.add_argument("--partition", default=None, help="slurm: partition")
            g.add_argument("--gpus", type=int, default=0, help="slurm: GPUs per run (one DDP task per GPU)")
            g.add_argument("--tasks-per-job", type=int, default=None,
                           help="processes per run (default: one per GPU, else 1); > 1 trains each run with DDP")
            g.add_argument("--cpus", type=int, default=4, help="slurm: CPUs per task")
            g.add_argument("--mem-gb", type=int, default=None, help="slurm: memory per node")
            g.add_argument("--time", type=int, default=240, help="slurm: minutes per job (preempted or timed-out "
                           "jobs are requeued and resume)")
            g.add_argument("--array-parallelism", type=int, default=32,
                           help="slurm: jobs of a wave's array running at once")
            g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                           help="slurm: an extra #SBATCH option, e.g. account=lab (repeatable)")
        if name in ("report", "all"):
            p.add_argument("--md", default="", help="rewrite the regime's study section of this markdown file")
    args = ap.parse_args(argv)
    if args.root is None:
        args.root = str(ROOT / "runs" / "study" / args.regime)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    if args.cmd == "run":
        return cmd_run(args)
    if args.cmd == "report":
        return cmd_report(args)
    failed = cmd_run(args)  # all: train what is missing, then write the tables (of what finished)
    return cmd_report(args) or failed


if __name__ == "__main__":
    sys.exit(main())
