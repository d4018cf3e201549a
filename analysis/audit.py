"""One model's audit: resolve it (:class:`~analysis.adapter.ModelAdapter`), extract it once, run the checks.

For each model (a run folder, or a plain classifier with a dataset) :func:`prepare` resolves the model into its
adapter and extracts latents, logits and CAMs on a seeded, group-stratified subsample of the split (and, when the
split holds a single environment, the run's ``val`` split too, for the environment analysis); :func:`audit_one`
then runs the registered checks (:mod:`analysis.checks`: Grad-CAM grids, the random-network baseline, latent
space, leakage probes, localisation, background swaps, CAM sanity, accuracy) through one loop that times each
and records a skip with its reason. :func:`analysis.report.audit` audits every model and writes the report.
Every option comes from one :class:`~analysis.settings.AuditSettings`.
"""

from __future__ import annotations

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
from torch import nn

from analysis.adapter import ModelAdapter
from analysis.checks import Check, CheckContext, resolve_checks, run_checks
from analysis.extract import Extraction, extract
from analysis.settings import AuditSettings
from ex2l_xai.errors import Ex2lError
from ex2l_xai.runfiles import RunFiles

log = logging.getLogger(__name__)

__all__ = ["AuditTarget", "ModelAudit", "Prepared", "audit_one", "jsonable", "load_results", "prepare"]


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
    for the environment analysis, the dataset (images for the overlays), and what the checks left for the figures
    (``artifacts``: e.g. ``interventions``, ``cam_sanity``)."""

    entry: dict[str, Any]
    extraction: Extraction
    env_extraction: Extraction
    dataset: Any
    dataset_key: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def interventions(self) -> Any:
        """The background swaps' :class:`~analysis.interventions.InterventionResult` (None when not run)."""
        return self.artifacts.get("interventions")

    @property
    def sanity(self) -> Any:
        """The CAM sanity check's :class:`~analysis.sanity.SanityResult` (None when not run)."""
        return self.artifacts.get("cam_sanity")


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
    return RunFiles(run_dir).read_results(missing_ok=True)


def _is_run(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike))


def run_dataset(config: Any, split: str, cache: dict[str, Any]) -> tuple[Any, str]:
    """A split of a run's dataset (built once per audit: ``cache``), and its cache key."""
    from ex2l_xai.data import get_dataset
    from ex2l_xai.train import dataset_kwargs

    kwargs = dataset_kwargs(config)
    key = json.dumps([config.data.name, split, kwargs], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = get_dataset(config.data.name, split, **kwargs)
    return cache[key], key


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


@dataclass
class Prepared:
    """A model resolved and extracted: its adapter, its extractions on the split (``extraction``, with CAMs unless
    asked otherwise) and for the environment analysis (``env_extraction``), and what the checks need to go on."""

    target: AuditTarget
    adapter: ModelAdapter
    extraction: Extraction
    env_extraction: Extraction
    env_note: str
    dataset: Any
    dataset_key: str
    results: dict[str, Any] | None = None
    entry: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> Any:
        """The run's configuration (None for a plain model)."""
        return self.adapter.config

    @property
    def model(self) -> nn.Module:
        """The audited module."""
        return self.adapter.model


def _resolve_run(target: AuditTarget, settings: AuditSettings, cache: dict[str, Any]
                 ) -> tuple[ModelAdapter, Any, str, dict[str, Any]]:
    """A run folder's adapter, the split of its dataset (with object masks where the run's data has them), the
    dataset's cache key and the entry's provenance."""
    from analysis.datasets import csv_masks, waterbirds_masks

    run = Path(target.model)
    if not RunFiles(run).best_file.is_file():
        raise Ex2lError(f"audit: {run} is not a finished run folder (no best.pt); train it with `ex2l train`")
    adapter = ModelAdapter.from_run(run, settings.device, target.name)
    config = adapter.config
    ds, key = run_dataset(config, settings.split, cache)
    if config.data.name == "csv":  # a mask column in the run's CSV: object masks for the audit
        ds = csv_masks(ds)
    if target.segmentations is not None:
        ds, key = waterbirds_masks(ds, target.segmentations), f"{key}+masks:{target.segmentations}"
    entry = {"name": adapter.name, "source": str(run), "algorithm": config.algorithm_name,
             "dataset": config.data.name, "dataset_options": dict(config.data.options), "seed": config.seed}
    return adapter, ds, key, entry


def _resolve_module(target: AuditTarget, settings: AuditSettings) -> tuple[ModelAdapter, Any, str, dict[str, Any]]:
    """A plain model's adapter, its dataset in dict samples, the dataset's key and the entry's provenance."""
    from analysis.datasets import as_audit_dataset

    if target.dataset is None:
        raise Ex2lError(f"audit: model {target.name or type(target.model).__name__} needs a dataset (dataset=...)")
    assert isinstance(target.model, nn.Module)
    ds = as_audit_dataset(target.dataset, confounders=target.confounders, envs=target.envs)
    info = target.info or {}
    adapter = ModelAdapter(target.model, name=target.name, layer=target.layer, forward_fn=target.forward_fn,
                           latent_fn=target.latent_fn, device=settings.device, info=info)
    entry = {"name": adapter.name, "source": info.get("source") or f"python object {type(target.model).__name__}",
             "algorithm": None, "dataset": getattr(ds, "name", None) or type(target.dataset).__name__,
             "normalization": adapter.normalization, "model_info": info or None}
    return adapter, ds, f"object:{id(target.dataset)}", entry


def _env_extraction(target: AuditTarget, adapter: ModelAdapter, ext: Extraction, settings: AuditSettings,
                    cache: dict[str, Any]) -> tuple[Extraction, str]:
    """The extraction the environment analysis uses: the split itself when it holds several environments, else
    ``env_dataset`` or the run's ``val`` split + the split, every environment capped at the median size."""
    s = settings
    if len(np.unique(ext.envs)) >= 2:
        return ext, f"{s.split} split"
    n_env = s.env_max_samples or s.max_samples
    common = {"max_samples": n_env, "cams": False, "seed": s.seed, "batch_size": s.batch_size}
    if target.env_dataset is not None:
        extra, note = extract(adapter, target.env_dataset, **common), f"env_dataset + {s.split} split"
    elif adapter.config is not None and s.split != "val":
        try:
            vds, _ = run_dataset(adapter.config, "val", cache)
        except Ex2lError as exc:  # a dataset without a val split: MMD_env stays undefined, with a reason
            log.warning("audit: %s has a single environment and no val split to add (%s)", s.split, exc)
            return ext, f"{s.split} split"
        extra, note = extract(adapter, vds, **common), f"val + {s.split} splits (the {s.split} split has a single environment)"
    else:
        return ext, f"{s.split} split"
    return _balanced_env_subset(Extraction.concat([extra, ext], name=ext.name), s.seed), note


def prepare(item: AuditTarget | nn.Module | str | os.PathLike[str], settings: AuditSettings | None = None, *,
            cams: bool = True, env: bool = True, dataset_cache: dict[str, Any] | None = None, dataset: Any = None,
            layer: Any = None, **options: Any) -> Prepared:
    """Resolve one model and extract it on ``settings.split`` (seeded, group-stratified subsample of
    ``settings.max_samples``); with ``env``, also build the set the environment analysis uses.

    ``options`` override fields of ``settings`` (e.g. ``max_samples=200``); ``dataset`` / ``layer`` apply to a
    plain ``nn.Module`` item (an :class:`AuditTarget` carries its own); ``dataset_cache`` shares the run datasets
    between the models of one audit.
    """
    s = (settings or AuditSettings()).replace(**options) if options else settings or AuditSettings()
    cache = dataset_cache if dataset_cache is not None else {}
    target = item if isinstance(item, AuditTarget) else AuditTarget(model=item, dataset=dataset, layer=layer)
    if _is_run(target.model):
        adapter, ds, key, entry = _resolve_run(target, s, cache)
    else:
        adapter, ds, key, entry = _resolve_module(target, s)
    ext = extract(adapter, ds, max_samples=s.max_samples, seed=s.seed, batch_size=s.batch_size, cams=cams,
                  variant=s.cam_variants[0])
    ext.meta["has_confounders"] = bool(getattr(ds, "has_confounders", True))
    if adapter.run is not None:
        ext.meta.update(run=str(adapter.run), algorithm=adapter.config.algorithm_name,
                        dataset=adapter.config.data.name, split=s.split)
    env_ext, env_note = _env_extraction(target, adapter, ext, s, cache) if env else (ext, f"{s.split} split")
    results = load_results(adapter.run) if adapter.run is not None else None
    return Prepared(target=target, adapter=adapter, extraction=ext, env_extraction=env_ext, env_note=env_note,
                    dataset=ds, dataset_key=key, results=results, entry=entry)


def audit_one(item: AuditTarget | nn.Module | str | os.PathLike[str], settings: AuditSettings | None = None, *,
              checks: Sequence[Check | str] | None = None, dataset_cache: dict[str, Any] | None = None,
              shared: dict[str, Any] | None = None, dataset: Any = None, layer: Any = None, env: bool = True,
              **options: Any) -> ModelAudit:
    """Audit one model: :func:`prepare`, then ``checks`` (default: every registered check, in order).

    ``options`` override fields of ``settings``; ``dataset`` / ``layer`` apply to a plain ``nn.Module`` item;
    ``shared`` holds what the models of one audit share (e.g. random baselines by architecture); ``env=False``
    skips building the environment analysis's set (for checks that do not read it: the study's diagnostics).
    """
    s = (settings or AuditSettings()).replace(**options) if options else settings or AuditSettings()
    cache = dataset_cache if dataset_cache is not None else {}
    t0 = time.time()
    prep = prepare(item, s, env=env, dataset_cache=cache, dataset=dataset, layer=layer)
    ext, entry = prep.extraction, prep.entry
    timings = {"extract": time.time() - t0}
    entry.update(split=s.split, n_samples=len(ext), n_split=ext.meta.get("n_dataset"), layer=prep.adapter.layer_path,
                 latent=prep.adapter.latent.description, latent_dim=int(ext.latents.shape[1]),
                 has_masks=ext.masks is not None, has_confounder_head=ext.cams_conf is not None,
                 model_kind=prep.adapter.kind,
                 mask_area=float(ext.masks.mean()) if ext.masks is not None else None)
    config = prep.adapter.config
    ctx = CheckContext(adapter=prep.adapter, extraction=ext, env_extraction=prep.env_extraction,
                       env_note=prep.env_note, dataset=prep.dataset, dataset_key=prep.dataset_key, settings=s,
                       entry=entry, target=prep.target, results=prep.results,
                       split_loader=(lambda split: run_dataset(config, split, cache)[0]) if config is not None
                       else None, shared=shared if shared is not None else {})
    timings.update(run_checks(ctx, resolve_checks(checks)))
    timings["total"] = time.time() - t0
    entry["seconds"] = timings
    return ModelAudit(entry=entry, extraction=ext, env_extraction=ctx.env_extraction, dataset=prep.dataset,
                      dataset_key=prep.dataset_key, timings=timings, artifacts=ctx.artifacts)
