"""The numbers of an audit: what :func:`analysis.report.audit` computes for each model before writing the report.

For each model (a run folder, or a plain classifier with a dataset) :func:`audit_one` extracts latents, logits
and CAMs on a seeded, group-stratified subsample of the split, and computes

* ``mmd_env``: :func:`analysis.mmd.mmd_env` of the latents across environments. When the audited split holds a
  single environment (the test split of Spawrious-style benchmarks), the run's ``val`` split (training
  environments) is extracted too and the environment analysis uses val + test, each environment capped at the
  same number of samples;
* ``leakage``: :func:`analysis.probes.leakage` of the confounder from the latents, from the label logits and from
  the latents of a randomly initialised copy of the network (for a run: the run's own initialisation, i.e. the
  same config and seed; for a plain model: ``copy.deepcopy`` + ``reset_parameters``);
* localisation: :func:`analysis.localization.localization_summary` of the label CAM at y (mass in the object mask
  and pointing game where masks exist, overlap with the confounder CAM where there is a confounder head, share of
  all-zero CAMs);
* the accuracy metrics of the run's ``results.json`` for the split (a plain model: computed on the subsample);
* ``interventions``: :func:`analysis.interventions.interventions` (background swaps: only-foreground,
  only-background, mixed-same, mixed-rand, BG-gap, flip rate) on a subsample of ``intervention_samples`` images,
  where the data allow it (the synthetic benchmark, or masks); "own-class" backgrounds are those of the run's
  train split (a plain model: ``AuditTarget.prior`` / ``reference_dataset``, else the audited data);
* ``cam_sanity``: :func:`analysis.sanity.cam_sanity` (cascading randomisation of the label CAMs) on
  ``sanity_samples`` images in ``sanity_steps`` steps, with its verdict.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.extract import Extraction, extract, random_copy
from ex2l_xai.errors import Ex2lError
from ex2l_xai.fileio import atomic_write

log = logging.getLogger(__name__)

__all__ = [
    "AuditTarget",
    "ModelAudit",
    "Prepared",
    "audit_one",
    "jsonable",
    "load_results",
    "markdown_table",
    "paper_figures",
    "prepare",
    "results_table",
]


@dataclass
class AuditTarget:
    """A model to audit: a run folder, or a torch classifier with the dataset (and options) to audit it on.

    ``env_dataset`` optionally gives a dataset with several environments for the MMD/UMAP analysis when
    ``dataset`` has only one; ``metrics`` optionally gives docs/architecture.md's metrics dict ``M`` to report.
    ``confounders`` / ``envs`` give one integer per sample of a plain ``(image, label)`` dataset
    (:class:`analysis.datasets.AuditDataset`). ``prior`` (an n_labels x n_confounders array of
    P(background | label)) or ``reference_dataset`` (its ``labels`` and ``confounders``: the training data) say
    which backgrounds are a class's own in the background swaps. ``segmentations``: for a Waterbirds run, the
    CUB-200-2011 ``segmentations/`` folder (object masks: :func:`analysis.datasets.waterbirds_masks`).
    ``info`` is reported as is (how a model trained elsewhere was loaded: ``kind``, ``weights``,
    ``normalization``).
    """

    model: nn.Module | str | os.PathLike[str]
    name: str | None = None
    dataset: Any = None
    layer: nn.Module | str | None = None
    forward_fn: Callable[..., Any] | None = None
    latent_fn: Any = None
    env_dataset: Any = None
    metrics: dict[str, Any] | None = None
    confounders: Any = None
    envs: Any = None
    prior: Any = None
    reference_dataset: Any = None
    segmentations: str | os.PathLike[str] | None = None
    info: dict[str, Any] | None = None


@dataclass
class ModelAudit:
    """One model's audit: its ``audit.json`` entry, the extraction on the split (with CAMs), the extraction used
    for the environment analysis, and the dataset (images for the overlays)."""

    entry: dict[str, Any]
    extraction: Extraction
    env_extraction: Extraction
    dataset: Any
    dataset_key: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    interventions: Any = None
    sanity: Any = None


def jsonable(obj: Any) -> Any:
    """A JSON-safe copy: numpy scalars/arrays to python, NaN/inf to None, keys to str, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def load_results(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A run folder's ``results.json`` (None when missing); a clear error when unreadable."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise Ex2lError(f"{path}: cannot read results.json ({exc})") from exc


def _is_run(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


def _run_dataset(config: Any, split: str, cache: dict[str, Any]) -> tuple[Any, str]:
    from ex2l_xai.data import get_dataset
    from ex2l_xai.train import dataset_kwargs

    kwargs = dataset_kwargs(config)
    key = json.dumps([config.data.name, split, kwargs], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = get_dataset(config.data.name, split, **kwargs)
    return cache[key], key


def _random_run_model(config: Any, dataset: Any) -> nn.Module:
    """The run's network at initialisation: same config, same seed, random weights (``pretrained`` ignored)."""
    from ex2l_xai.train import build_model

    cfg = copy.deepcopy(config)
    cfg.model.pretrained = "none"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, dataset.n_labels, dataset.n_confounders)
    return model.eval()


def _balanced_env_subset(ext: Extraction, seed: int) -> Extraction:
    """Cap every environment at the median environment size (seeded), so that no environment dominates a plot."""
    envs, counts = np.unique(ext.envs, return_counts=True)
    if len(envs) < 2:
        return ext
    cap = int(np.median(counts))
    rng = np.random.default_rng(seed)
    keep = []
    for env in envs:
        members = np.flatnonzero(ext.envs == env)
        keep.append(np.sort(rng.choice(members, size=min(cap, members.size), replace=False)))
    idx = np.sort(np.concatenate(keep))
    if idx.size == len(ext):
        return ext
    return _take(ext, idx)


def _take(ext: Extraction, idx: np.ndarray) -> Extraction:
    keys = ("latents", "logits", "conf_logits", "preds", "labels", "confounders", "envs", "indices", "masks",
            "cams_true", "cams_pred", "cams_conf")
    values = {k: (getattr(ext, k)[idx] if getattr(ext, k) is not None else None) for k in keys}
    return Extraction(
        **values, label_names=ext.label_names, confounder_names=ext.confounder_names, env_names=ext.env_names,
        name=ext.name, image_size=ext.image_size, meta=dict(ext.meta),
    )


def _sample_metrics(ext: Extraction) -> dict[str, Any]:
    from ex2l_xai.metrics import group_metrics

    return group_metrics(ext.preds, ext.labels, ext.groups, ext.group_names)


@dataclass
class Prepared:
    """A model's extractions: on the split (``extraction``, with CAMs unless asked otherwise) and for the
    environment analysis (``env_extraction``), plus what the audit needs to go on."""

    target: AuditTarget
    extraction: Extraction
    env_extraction: Extraction
    env_note: str
    dataset: Any
    dataset_key: str
    config: Any = None
    results: dict[str, Any] | None = None
    entry: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = None


def prepare(
    item: AuditTarget | nn.Module | str | os.PathLike[str],
    *,
    split: str = "test",
    max_samples: int | None = 2000,
    env_max_samples: int | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 128,
    cams: bool = True,
    env: bool = True,
    dataset_cache: dict[str, Any] | None = None,
    dataset: Any = None,
    layer: Any = None,
) -> Prepared:
    """Extract one model on ``split`` (seeded, group-stratified subsample of ``max_samples``) and, with ``env``,
    build the set the environment analysis uses (the split itself when it holds several environments, else
    the run's ``val`` split + the split, every environment capped at the median environment size)."""
    from analysis.datasets import as_audit_dataset, csv_masks, waterbirds_masks
    from analysis.extract import PRETTY

    cache = dataset_cache if dataset_cache is not None else {}
    target = item if isinstance(item, AuditTarget) else AuditTarget(model=item, dataset=dataset, layer=layer)
    if not _is_run(target.model) and target.dataset is None:
        raise Ex2lError(f"audit: model {target.name or type(target.model).__name__} needs a dataset (dataset=...)")
    entry: dict[str, Any] = {"name": target.name}
    results, config = None, None
    common = {"seed": seed, "device": device, "batch_size": batch_size}
    if _is_run(target.model):
        from ex2l_xai.train import load_run_config, load_run_model

        run = Path(target.model)
        if not (run / "best.pt").is_file():
            raise Ex2lError(f"audit: {run} is not a finished run folder (no best.pt); train it with `ex2l train`")
        config = load_run_config(run)
        ds, key = _run_dataset(config, split, cache)
        if config.data.name == "csv":  # a mask column in the run's CSV: object masks for the audit
            ds = csv_masks(ds)
        if target.segmentations is not None:
            ds, key = waterbirds_masks(ds, target.segmentations), f"{key}+masks:{target.segmentations}"
        model, _ = load_run_model(run, device or "cpu")
        name = target.name or PRETTY.get(config.algorithm_name.lower(), config.algorithm_name)
        ext = extract(model, ds, max_samples=max_samples, name=name, cams=cams, **common)
        ext.meta.update(run=str(run), algorithm=config.algorithm_name, dataset=config.data.name, split=split)
        results = load_results(run)
        entry.update(
            name=ext.name, source=str(run), algorithm=config.algorithm_name, dataset=config.data.name,
            dataset_options=dict(config.data.options), seed=config.seed,
        )
    else:
        model = target.model
        assert isinstance(model, nn.Module)
        ds = as_audit_dataset(target.dataset, confounders=target.confounders, envs=target.envs)
        key = f"object:{id(target.dataset)}"
        ext = extract(model, ds, layer=target.layer, forward_fn=target.forward_fn, latent_fn=target.latent_fn,
                      max_samples=max_samples, name=target.name, cams=cams, **common)
        info = target.info or {}
        entry.update(name=ext.name, source=info.get("source") or f"python object {type(model).__name__}",
                     algorithm=None, dataset=getattr(ds, "name", None) or type(target.dataset).__name__,
                     normalization=info.get("normalization"), model_info=info or None)
    env_ext, env_note = ext, f"{split} split"
    if env and len(np.unique(ext.envs)) < 2:
        extra = None
        n_env = env_max_samples or max_samples
        if target.env_dataset is not None:
            extra = extract(model, target.env_dataset, layer=target.layer, forward_fn=target.forward_fn,
                            latent_fn=target.latent_fn, max_samples=n_env, cams=False, **common)
            env_note = f"env_dataset + {split} split"
        elif config is not None and split != "val":
            try:
                vds, _ = _run_dataset(config, "val", cache)
            except Ex2lError as exc:  # a dataset without a val split: MMD_env stays undefined, with a reason
                log.warning("audit: %s has a single environment and no val split to add (%s)", split, exc)
                vds = None
            if vds is not None:
                extra = extract(model, vds, max_samples=n_env, cams=False, **common)
                env_note = f"val + {split} splits (the {split} split has a single environment)"
        if extra is not None:
            env_ext = _balanced_env_subset(Extraction.concat([extra, ext], name=ext.name), seed)
    return Prepared(target=target, extraction=ext, env_extraction=env_ext, env_note=env_note, dataset=ds,
                    dataset_key=key, config=config, results=results, entry=entry, model=model)


def audit_one(
    item: AuditTarget | nn.Module | str | os.PathLike[str],
    *,
    split: str = "test",
    max_samples: int | None = 2000,
    env_max_samples: int | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 128,
    probe_max_samples: int | None = 5000,
    dataset_cache: dict[str, Any] | None = None,
    dataset: Any = None,
    layer: Any = None,
    intervention_samples: int | None = 240,
    sanity_samples: int | None = 32,
    sanity_steps: int = 5,
) -> ModelAudit:
    """Audit one model (see the module docstring); returns its :class:`ModelAudit`.

    ``dataset`` / ``layer`` apply to a plain ``nn.Module`` item (an :class:`AuditTarget` carries its own).
    ``env_max_samples`` caps the extra ``val`` extraction of a single-environment split (default: max_samples).
    ``intervention_samples`` / ``sanity_samples``: images for the background swaps and the CAM sanity check
    (0 or None: skip that check); ``sanity_steps``: its cascade steps.
    """
    from threadpoolctl import threadpool_limits

    from analysis.localization import localization_summary
    from analysis.mmd import mmd_env
    from analysis.probes import leakage

    timings: dict[str, float] = {}
    t0 = time.time()
    prep = prepare(item, split=split, max_samples=max_samples, env_max_samples=env_max_samples, seed=seed,
                   device=device, batch_size=batch_size, dataset_cache=dataset_cache, dataset=dataset, layer=layer)
    target, ext, env_ext, ds = prep.target, prep.extraction, prep.env_extraction, prep.dataset
    entry = prep.entry
    timings["extract"] = time.time() - t0
    entry.update(split=split, n_samples=len(ext), n_split=ext.meta.get("n_dataset"),
                 layer=ext.meta.get("layer"), latent=ext.meta.get("latent"), latent_dim=int(ext.latents.shape[1]),
                 has_masks=ext.masks is not None, has_confounder_head=ext.cams_conf is not None)

    # random-network baseline: same samples, latents only
    t = time.time()
    if prep.config is not None:
        rand_model = _random_run_model(prep.config, ds)
        rand_ext = extract(rand_model, ds, indices=ext.indices, cams=False, device=device, batch_size=batch_size)
    else:
        model = target.model
        assert isinstance(model, nn.Module)
        rand_model = random_copy(model, seed)
        rand_ext = extract(rand_model, ds, layer=_same_path(model, rand_model, target.layer),
                           latent_fn=_same_path(model, rand_model, target.latent_fn),
                           indices=ext.indices, cams=False, device=device, batch_size=batch_size)
    timings["random_network"] = time.time() - t

    t = time.time()
    mmd = mmd_env(env_ext.latents, env_ext.envs, seed=seed)
    entry["mmd_env"] = mmd["mmd_env"]
    entry["mmd"] = {**mmd, "data": prep.env_note, "n": len(env_ext),
                    "env_names": {int(e): env_ext.env_names[int(e)] for e in mmd["envs"]}}
    timings["mmd"] = time.time() - t

    t = time.time()
    # one BLAS/OpenMP thread: these small logistic regressions run 10x slower when threads oversubscribe the CPU
    with threadpool_limits(limits=1):
        leak = leakage(ext.latents, ext.labels, ext.confounders, logits=ext.logits,
                       random_latents=rand_ext.latents, seed=seed, max_samples=probe_max_samples)
    leak["random_confounder_probe_acc"] = leak["random"]["confounder"]["balanced_acc"] if leak["random"] else None
    leak["label_probe_acc"] = leak["label"]["balanced_acc"]
    entry["leakage"] = leak
    timings["probes"] = time.time() - t

    t = time.time()
    loc = localization_summary(ext.cams_true, ext.masks, ext.cams_conf)
    entry.update(
        cam_overlap=loc["cam_overlap"], cam_in_mask=loc["cam_in_mask"], zero_cam_share=loc["zero_cam_share"],
        pointing_game=loc["pointing_game"], conf_zero_cam_share=loc.get("conf_zero_cam_share"), localization=loc,
    )
    timings["localization"] = time.time() - t

    model = prep.model
    assert model is not None
    t = time.time()
    ivr = None
    if intervention_samples:
        ivr = _interventions(prep, model, intervention_samples, seed, device, batch_size, dataset_cache)
        entry["interventions"] = ivr.summary
    else:
        entry["interventions"] = {"available": False, "reason": "skipped (intervention_samples=0)"}
    entry["bg_gap"] = entry["interventions"].get("bg_gap")
    timings["interventions"] = time.time() - t
    t = time.time()
    sanity = None
    if not sanity_samples:
        entry["cam_sanity"] = {"available": False, "reason": "skipped (sanity_samples=0)"}
    elif target.forward_fn is not None:
        entry["cam_sanity"] = {"available": False, "reason": "not run for a model with a custom forward_fn"}
    else:
        from analysis.sanity import cam_sanity

        layer_spec = None if prep.config is not None else target.layer
        try:
            sanity = cam_sanity(model, ds, layer=layer_spec, max_samples=sanity_samples, steps=sanity_steps,
                                seed=seed, device=device)
            entry["cam_sanity"] = {"available": True, **sanity.summary}
        except Ex2lError as exc:
            entry["cam_sanity"] = {"available": False, "reason": str(exc)}
    entry["cam_sanity_passes"] = entry["cam_sanity"].get("passes")
    timings["cam_sanity"] = time.time() - t

    sample = _sample_metrics(ext)
    metrics = target.metrics
    source = "given"
    results = prep.results
    if metrics is None and results is not None and isinstance(results.get(split), dict):
        metrics, source = results[split], "results.json"
    if metrics is None:
        metrics, source = sample, "audit sample"
    entry.update({k: metrics.get(k) for k in ("avg_acc", "worst_group_acc", "mean_group_acc", "per_group")})
    entry["metrics_source"] = source
    entry["sample_metrics"] = sample
    if results is not None:
        entry["selected_epoch"] = results.get("selected_epoch")
    timings["total"] = time.time() - t0
    entry["seconds"] = timings
    return ModelAudit(entry=entry, extraction=ext, env_extraction=env_ext, dataset=ds, dataset_key=prep.dataset_key,
                      timings=timings, interventions=ivr, sanity=sanity)


def _interventions(prep: Prepared, model: nn.Module, n: int, seed: int, device: str | None, batch_size: int,
                   cache: dict[str, Any] | None) -> Any:
    """The background swaps of one model, with the run's train split (or the target's prior) as "own class"."""
    from analysis.interventions import InterventionResult, background_prior, interventions

    target, ds = prep.target, prep.dataset
    prior, source = None, "the audited data"
    n_labels, n_conf = len(prep.extraction.label_names), len(prep.extraction.confounder_names)
    if target.prior is not None:
        prior, source = np.asarray(target.prior, dtype=np.float64), "given"
    elif target.reference_dataset is not None or prep.config is not None:
        ref = target.reference_dataset
        if ref is None:
            try:
                ref, _ = _run_dataset(prep.config, "train", cache if cache is not None else {})
            except Ex2lError as exc:
                log.warning("audit: no train split for the background prior (%s); using the audited data", exc)
        if ref is not None:
            prior = background_prior(ref.labels, ref.confounders, n_labels, n_conf)
            source = "the run's train split" if target.reference_dataset is None else "reference_dataset"
    try:
        res = interventions(model, ds, max_samples=n, prior=prior, seed=seed, device=device,
                            batch_size=min(batch_size, 64), forward_fn=target.forward_fn)
    except Ex2lError as exc:
        return InterventionResult({"available": False, "reason": str(exc)})
    if res.summary.get("available"):
        res.summary["prior_source"] = source
    return res


def _same_path(model: nn.Module, clone: nn.Module, spec: Any) -> Any:
    """Map a module of ``model`` to the module at the same path in its copy ``clone`` (strings pass through)."""
    if not isinstance(spec, nn.Module):
        return spec
    for path, m in model.named_modules():
        if m is spec:
            return clone.get_submodule(path) if path else clone
    return spec


# ---- results table over seeds --------------------------------------------------------------------------------
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
    from analysis.extract import PRETTY

    return PRETTY.get(str(name).lower(), str(name))


def paper_figures(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    which: Sequence[str] = ("fig1", "fig2", "fig3", "table"),
    split: str = "test",
    max_samples: int | None = 2000,
    seed: int = 0,
    rule: str = "worst_groups",
    n_rows: int = 6,
    cam: str = "true",
    show_conf: bool = False,
    umap_epochs: int | None = None,
    names: Sequence[str] | None = None,
    device: str | None = None,
    dpi: int = 130,
) -> dict[str, Path]:
    """Regenerate the paper's artefacts from run folders into ``out_dir``: ``fig1_gradcam_grid.png``,
    ``fig2_umap.png``, ``fig3_umap_env.png`` and ``table_results.md``; returns {artefact: path}."""
    from analysis.embeddings import embed, embedding_figure
    from analysis.mmd import mmd_env
    from analysis.overlays import gradcam_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(which) - {"fig1", "fig2", "fig3", "table"})
    if unknown:
        raise Ex2lError(f"paper_figures: unknown artefact {unknown[0]!r}; expected fig1, fig2, fig3 or table")
    if names is not None and len(names) != len(run_dirs):
        raise Ex2lError(f"paper_figures: {len(names)} names for {len(run_dirs)} runs")
    written: dict[str, Path] = {}
    if "table" in which:
        path = out / "table_results.md"
        atomic_write(path, markdown_table(results_table(run_dirs, split), split))
        written["table"] = path
    figs = [w for w in which if w != "table"]
    if not figs:
        return written
    cache: dict[str, Any] = {}
    preps = [
        prepare(AuditTarget(model=r, name=names[i] if names else None), split=split, max_samples=max_samples,
                seed=seed, device=device, cams="fig1" in figs, env=bool({"fig2", "fig3"} & set(figs)),
                dataset_cache=cache)
        for i, r in enumerate(run_dirs)
    ]
    if "fig1" in figs:
        same = [p for p in preps if p.dataset_key == preps[0].dataset_key]
        path = out / "fig1_gradcam_grid.png"
        gradcam_grid([p.extraction for p in same], same[0].dataset, path, rule=rule, n_rows=n_rows, seed=seed,
                     cam=cam, show_conf=show_conf, dpi=dpi)
        written["fig1"] = path
    if {"fig2", "fig3"} & set(figs):
        envs = [p.env_extraction for p in preps]
        embs = [embed(e.latents, seed=seed, n_epochs=umap_epochs) for e in envs]
        mmds = [mmd_env(e.latents, e.envs, seed=seed)["mmd_env"] for e in envs]
        if "fig2" in figs:
            path = out / "fig2_umap.png"
            embedding_figure(envs, embs, path, colour_by=("label", "confounder"), mmd=mmds, seed=seed, dpi=dpi)
            written["fig2"] = path
        if "fig3" in figs:
            path = out / "fig3_umap_env.png"
            embedding_figure(envs, embs, path, colour_by=("env",), mmd=mmds, seed=seed, dpi=dpi)
            written["fig3"] = path
    return written
