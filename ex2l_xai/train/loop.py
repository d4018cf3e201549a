"""The training loop: the run's stages, epochs, optimiser steps, evaluation, model selection, checkpoints and
resume. Everything algorithm-specific comes through the hooks of :class:`~ex2l_xai.algorithms.Algorithm`.

The pieces a distributed run replaces are each in one place: the loaders (:mod:`ex2l_xai.train.loaders`),
:func:`optimizer_step` (backward, clipping and every optimiser's step), and :func:`evaluate_algorithm`.

Under DDP (a process group open, :mod:`ex2l_xai.distributed`) the algorithm's training step runs inside
``torch.nn.parallel.DistributedDataParallel`` (so its backward all-reduces the gradients; frozen parameters are
left out, as DDP leaves out every parameter without ``requires_grad``), the batch norms compute global-batch
statistics (:mod:`ex2l_xai.train.syncbn`), each step's loss parts are averaged over ranks (a non-finite loss on
any rank stops every rank), and only rank 0 writes the run folder. The algorithm, its model and the checkpoints
stay unwrapped: a DDP run's folder loads like any other.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ex2l_xai import distributed
from ex2l_xai.algorithms import Algorithm, Stage, StageContext, StepContext, StepOutput
from ex2l_xai.config import Config
from ex2l_xai.errors import ConfigError, Ex2lError, TrainingError
from ex2l_xai.models import FrozenPrefixCache
from ex2l_xai.train.builders import (
    EVAL_SPLITS,
    build_datasets,
    build_model,
    build_optimizer,
    build_run_algorithm,
    build_scheduler,
    resolve_device,
    seed_everything,
)
from ex2l_xai.train.evaluation import evaluate_algorithm
from ex2l_xai.train.loaders import eval_loader, to_device, train_loader
from ex2l_xai.train.rng import rng_state, seed_epoch, set_rng_state
from ex2l_xai.train.rundir import (
    RunFolder,
    best_payload,
    results_of,
    selection_key,
    selection_score,
    summary_line,
)
from ex2l_xai.train.syncbn import sync_batchnorm

log = logging.getLogger("ex2l_xai.train")

__all__ = ["StepModule", "check_optimizers", "check_stages", "cudnn_flags", "optimizer_step", "train"]

STAGE_KINDS = ("train", "fit")


def train(
    config: Config,
    out_dir: str | os.PathLike[str],
    *,
    quiet: bool = False,
    prefix_cache: FrozenPrefixCache | None = None,
) -> dict[str, Any]:
    """Train ``config`` into the run folder ``out_dir`` and return its ``results.json`` as a dict.

    A folder with ``done`` is skipped (its results are returned); a folder with ``checkpoint.pt`` is resumed.
    Both require the folder's ``config.yaml`` to match ``config`` (``train.quiet`` and ``train.device`` aside).

    Parameters
    ----------
    config : Config
        The configuration (see :func:`ex2l_xai.config.load_config`).
    out_dir : path
        The run folder (created if missing).
    quiet : bool
        No progress bars; per-epoch summaries at DEBUG instead of INFO level.
    prefix_cache : FrozenPrefixCache, optional
        With ``model.cache_frozen``: the cache of the frozen prefix's outputs (default: the model's own). Runs
        given one cache compute each image's prefix once across them (the demo's three runs); its entries name
        the prefix's weights, so runs of other weights never share an output.

    Under ``torchrun`` (a process group open, see :func:`ex2l_xai.distributed.process_group`) every rank calls
    it with the same arguments; the run is trained with DDP, ``data.batch_size`` is the global batch, and rank 0
    writes the folder (``results.json`` then holds ``world_size``).

    Raises
    ------
    TrainingError
        On a non-finite loss (the last good checkpoint is kept), or a folder started with another config.
    ConfigError
        When the algorithm cannot train on the data (e.g. an environment-based method with one environment).
    """
    folder = RunFolder(out_dir)
    quiet = quiet or config.train.quiet or not distributed.is_main()
    level = logging.DEBUG if quiet else logging.INFO
    # rank 0 checks and prepares the folder; every rank learns the outcome (so an error stops them all)
    outcome: tuple[str, Any] = ("go", None)
    failure: Ex2lError | None = None
    if distributed.is_main():
        try:
            outcome = _prepare_folder(config, folder, level)
        except Ex2lError as exc:
            if not distributed.is_active():
                raise
            failure, outcome = exc, ("error", (isinstance(exc, ConfigError), str(exc)))
    kind, value = distributed.broadcast_object(outcome)
    if failure is not None:
        raise failure
    if kind == "error":
        raise (ConfigError if value[0] else TrainingError)(value[1])
    if kind == "done":
        return value

    device = resolve_device(config.train.device)
    if distributed.is_active() and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
    with cudnn_flags(config.train.deterministic):
        seed_everything(config.seed)
        datasets = build_datasets(config)
        algorithm = build_run_algorithm(config, datasets["train"], device, prefix_cache)
        return _Run(config, folder, algorithm, datasets, device, quiet).run()


@contextmanager
def cudnn_flags(deterministic: bool) -> Iterator[None]:
    """cuDNN's flags for one run, restored on the way out (also on an error): deterministic kernels, or the
    benchmark mode's fastest ones (``train.deterministic``). No effect on CPU computations."""
    cudnn = torch.backends.cudnn
    before = cudnn.deterministic, cudnn.benchmark
    cudnn.deterministic, cudnn.benchmark = deterministic, not deterministic
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = before


def _prepare_folder(config: Config, folder: RunFolder, level: int) -> tuple[str, Any]:
    """Check ``folder`` against ``config`` and write its ``config.yaml``: ``("done", results)`` for a finished
    run, else ``("go", None)``."""
    folder.create()
    if folder.exists():
        folder.check_config(config)
    if folder.is_done():
        try:
            results = folder.read_results()
        except TrainingError as exc:
            raise TrainingError(f"{folder.path}: marked done but {exc}") from exc
        log.log(level, "%s: already done, skipped (%s)", folder.path, config.algorithm_name)
        return "done", results
    folder.write_config(config)
    return "go", None


def check_stages(name: str, stages: list[Stage]) -> None:
    """TrainingError for stages the trainer cannot run: none, a repeated name, an unknown kind, fewer than one
    epoch, or a last stage that is not selectable (the run's model must come from it)."""
    if not stages:
        raise TrainingError(f"algorithm {name}: stages() returned no stage")
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise TrainingError(f"algorithm {name}: stage names must be unique, got {names}")
    for s in stages:
        if s.kind not in STAGE_KINDS:
            raise TrainingError(f"algorithm {name}: stage {s.name!r} has kind {s.kind!r}; expected one of {STAGE_KINDS}")
        if s.epochs < 1 or (s.kind == "fit" and s.epochs != 1):
            raise TrainingError(f"algorithm {name}: stage {s.name!r} has {s.epochs} epochs; expected >= 1 (fit: 1)")
    if not stages[-1].selectable:
        raise TrainingError(f"algorithm {name}: the last stage ({stages[-1].name!r}) must be selectable")


def optimizer_step(out: StepOutput, optimizers: dict[str, torch.optim.Optimizer], grad_clip: float) -> None:
    """The one place where the loss is backpropagated and optimisers step: the states named in ``out.reset``
    are cleared, every gradient is zeroed, then each optimiser in ``out.optimizers`` clips (``grad_clip`` > 0)
    and steps."""
    unknown = [n for n in (*out.optimizers, *out.reset) if n not in optimizers]
    if unknown:
        raise TrainingError(f"the step names optimiser {unknown[0]!r}; this stage has {sorted(optimizers)}")
    for name in out.reset:
        optimizers[name].state.clear()
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    out.loss.backward()
    for name in out.optimizers:
        opt = optimizers[name]
        if grad_clip > 0:
            nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
        opt.step()


def check_optimizers(name: str, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """TrainingError when a parameter is in two optimisers, or an algorithm's own optimiser (any but
    ``"model"``, which may list the frozen prefix: it never gets a gradient) holds a frozen parameter."""
    seen: dict[int, str] = {}
    for opt_name, opt in optimizers.items():
        for p in (p for g in opt.param_groups for p in g["params"]):
            if id(p) in seen:
                raise TrainingError(f"algorithm {name}: a parameter is in two optimisers ({seen[id(p)]}, {opt_name})")
            seen[id(p)] = opt_name
            if opt_name != "model" and not p.requires_grad:
                raise TrainingError(
                    f"algorithm {name}: optimiser {opt_name!r} holds a frozen parameter (requires_grad=False)"
                )


class _Run:
    """One call of :func:`train`: the state that lives across stages and epochs."""

    def __init__(
        self,
        config: Config,
        folder: RunFolder,
        algorithm: Algorithm,
        datasets: dict[str, Any],
        device: torch.device,
        quiet: bool,
    ) -> None:
        self.config, self.folder, self.algorithm, self.datasets, self.device = config, folder, algorithm, datasets, device
        self.out = folder.path
        self.quiet = quiet
        self.level = logging.DEBUG if quiet else logging.INFO
        self.name = config.algorithm_name
        self.seed = config.seed
        self.stages = algorithm.stages()
        check_stages(self.name, self.stages)
        self.total = sum(s.epochs for s in self.stages)
        self.rank, self.world, self.main = distributed.rank(), distributed.world_size(), distributed.is_main()
        self.eval_splits = [s for s in EVAL_SPLITS if s in datasets]
        self.eval_loaders = {s: eval_loader(config, datasets[s], device=device, rank=self.rank, world=self.world)
                             for s in self.eval_splits}
        self.step, self.elapsed = 0, 0.0
        self.best: dict[str, Any] | None = None  # {"epoch", "score", "record"}
        self.show_bar = not quiet and sys.stderr.isatty()
        self.stepper: StepModule | None = None
        self.ddp: nn.Module | None = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.stepper = StepModule(algorithm)
            sync_batchnorm(algorithm)
            # buffers are equal on every rank by construction (global-batch norms, all-reduced GroupDRO q), so
            # nothing is broadcast per step; the constructor still broadcasts rank 0's parameters and buffers once
            self.ddp = DistributedDataParallel(
                self.stepper,
                device_ids=None,
                forward_sync_buffers=False,
                find_unused_parameters=algorithm.ddp_find_unused_parameters(),
            )

    # ---- stage helpers ------------------------------------------------------------------------------------
    def _fresh_model(self) -> nn.Module:
        train_set = self.datasets["train"]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_model(self.config, train_set.n_labels, train_set.n_confounders,
                                prefix_cache=self.algorithm.model.prefix_cache,
                                image_size=getattr(train_set, "image_size", None))
        return model.to(self.device)

    def _stage_context(self) -> StageContext:
        return StageContext(
            datasets=self.datasets,
            device=self.device,
            seed=self.seed,
            eval_loader=lambda split: eval_loader(self.config, self.datasets[split], device=self.device),
            fresh_model=self._fresh_model,
        )

    def _optimizers(self, stage: Stage) -> dict[str, torch.optim.Optimizer]:
        optimizers = self.algorithm.configure_optimizers(partial(build_optimizer, self.config), stage)
        if "model" not in optimizers:
            raise TrainingError(f"algorithm {self.name}: configure_optimizers() returned no 'model' optimiser")
        check_optimizers(self.name, optimizers)
        return optimizers

    # ---- resume -------------------------------------------------------------------------------------------
    def _load_checkpoint(self) -> dict[str, Any] | None:
        found = distributed.broadcast_object(self.folder.has_checkpoint())  # rank 0's view of the folder
        if not found:
            if self.main:
                self.folder.clear_progress()
            return None
        ckpt = self.folder.load_checkpoint()  # RNG states stay on the CPU
        try:
            self.algorithm.load_state_dict(ckpt["algorithm"])
        except Ex2lError:
            raise
        except Exception as exc:
            raise TrainingError(
                f"{self.folder.checkpoint_file}: cannot resume from this checkpoint ({exc}); delete it to restart"
            ) from exc
        set_rng_state(ckpt["rng"])
        self.step, self.elapsed, self.best = ckpt["step"], ckpt["elapsed"], ckpt["best"]
        if self.main:
            self.folder.truncate_metrics(ckpt["epoch"])
        before = ckpt.get("world_size", 1)
        if before != self.world:
            log.warning("%s: resuming a run of %d process(es) with %d: the batches of the remaining epochs are "
                        "dealt out differently, so it will not equal an uninterrupted run", self.out, before,
                        self.world)
        log.log(self.level, "%s: resuming %s after epoch %d", self.out, self.name, ckpt["epoch"])
        return ckpt

    def _restore_optimizers(self, ckpt: dict[str, Any], optimizers: dict, schedulers: dict) -> None:
        try:
            for name in optimizers:
                opt_state = ckpt["optimizer"] if name == "model" else ckpt["optimizers"][name]
                sched_state = ckpt["scheduler"] if name == "model" else ckpt["schedulers"][name]
                optimizers[name].load_state_dict(opt_state)
                schedulers[name].load_state_dict(sched_state)
        except Exception as exc:
            raise TrainingError(
                f"{self.folder.checkpoint_file}: cannot resume from this checkpoint ({exc}); delete it to restart"
            ) from exc

    # ---- the run ------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        ckpt = self._load_checkpoint()
        distributed.barrier()  # every rank has read the folder before rank 0 writes to it again
        first_epoch = ckpt["epoch"] if ckpt is not None else 0
        start = 0
        for stage in self.stages:
            end = start + stage.epochs
            if end > first_epoch:
                self._run_stage(stage, start, first_epoch, ckpt if first_epoch > start else None)
            start = end
        assert self.best is not None  # the last stage is selectable and its last epoch always evaluated
        results = results_of(self.config, self.best, self.total, self.elapsed)
        if self.world > 1:
            results["world_size"] = self.world
        if self.main:
            self.folder.finish(results)
        distributed.barrier()
        log.log(self.level, "%s: done in %.1f s (selected epoch %d)", self.out, self.elapsed, self.best["epoch"])
        return results

    def _run_stage(self, stage: Stage, start: int, first_epoch: int, resume_from: dict[str, Any] | None) -> None:
        """Epochs ``max(start, first_epoch)`` .. ``start + stage.epochs - 1``; ``resume_from`` is the checkpoint
        when the run resumes inside this stage (then its start hook is not called again)."""
        ctx = self._stage_context()
        if resume_from is None:
            self.algorithm.on_stage_start(stage, ctx)
        optimizers: dict[str, torch.optim.Optimizer] = {}
        schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        if stage.kind == "train":
            optimizers = self._optimizers(stage)
            schedulers = {n: build_scheduler(self.config, o, stage.epochs) for n, o in optimizers.items()}
            if resume_from is not None:
                self._restore_optimizers(resume_from, optimizers, schedulers)
        for epoch in range(max(start, first_epoch), start + stage.epochs):
            t0 = time.time()
            seed_epoch(self.seed, epoch)
            if stage.kind == "train":
                lr, losses = self._train_epoch(stage, epoch, epoch - start, optimizers)
                for s in schedulers.values():
                    s.step()
            else:
                lr, losses = None, {k: float(v) for k, v in self.algorithm.fit(stage, ctx).items()}
            stats = self._mean_over_ranks({k: float(v) for k, v in self.algorithm.epoch_stats().items()})
            done_epoch = epoch + 1
            last_of_stage = done_epoch == start + stage.epochs
            if done_epoch % self.config.train.eval_every == 0 or last_of_stage or stage.kind == "fit":
                self._evaluate(stage, done_epoch, lr, losses, stats, t0)
            self.elapsed += time.time() - t0
            self._checkpoint(done_epoch, optimizers, schedulers)

    def _train_epoch(
        self, stage: Stage, epoch: int, stage_epoch: int, optimizers: dict[str, torch.optim.Optimizer]
    ) -> tuple[float, dict[str, float]]:
        train_set = self.datasets["train"]
        indices = self.algorithm.train_indices(stage, train_set)
        loader = train_loader(self.config, train_set, seed=self.seed * 1000 + epoch, device=self.device,
                              indices=indices, rank=self.rank, world=self.world)
        lr = optimizers["model"].param_groups[0]["lr"]
        self.algorithm.train()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}  # a part is averaged over the steps that report it (DANN alternates)
        n_batches = 0
        label = f"{self.name}{f' [{stage.name}]' if len(self.stages) > 1 else ''}"
        bar = tqdm(loader, desc=f"{label} epoch {epoch + 1}/{self.total}", disable=not self.show_bar, leave=False)
        for batch in bar:
            batch = to_device(batch, self.device)
            out = self._training_step(batch, StepContext(stage_epoch, self.step, stage))
            if not self._all_finite(out):
                kept_msg = (
                    f"the last good checkpoint (epoch {epoch}) is kept in {self.folder.checkpoint_file}"
                    if self.folder.has_checkpoint()
                    else "no checkpoint was written yet"
                )
                raise TrainingError(
                    f"non-finite loss ({float(out.loss.detach())}) at epoch {epoch + 1}, step {self.step + 1} "
                    f"(batch {n_batches + 1}) of {self.out}; training stopped, {kept_msg}; try a lower optim.lr "
                    "or train.grad_clip"
                )
            optimizer_step(out, optimizers, self.config.train.grad_clip)
            self.step += 1
            n_batches += 1
            for k, v in out.parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
            if self.show_bar:
                bar.set_postfix(loss=f"{out.parts.get('loss', float(out.loss.detach())):.3f}")
        bar.close()
        return lr, {k: v / counts[k] for k, v in sums.items()}

    def _training_step(self, batch: dict[str, Any], ctx: StepContext) -> StepOutput:
        """The algorithm's step, inside DDP's forward under DDP (its backward then all-reduces the gradients)."""
        if self.ddp is None or self.stepper is None:
            return self.algorithm.training_step(batch, ctx)
        loss = self.ddp(batch, ctx)
        out = self.stepper.last
        assert out is not None
        out.loss = loss  # DDP's output, which its backward hooks are attached to
        return out

    def _all_finite(self, out: StepOutput) -> bool:
        """Whether every rank's loss is finite; under DDP the step's logged parts become their mean over ranks
        (the whole global batch's, for parts that are batch means)."""
        finite = bool(torch.isfinite(out.loss.detach()))
        if self.world == 1:
            return finite
        keys = sorted(out.parts)
        values = torch.tensor([0.0 if finite else 1.0, *(float(out.parts[k]) for k in keys)], dtype=torch.float64,
                              device=self.device)
        values = distributed.all_reduce_sum(values)
        out.parts = {k: float(v) / self.world for k, v in zip(keys, values[1:].tolist(), strict=True)}
        return bool(values[0] == 0)

    def _mean_over_ranks(self, stats: dict[str, float]) -> dict[str, float]:
        """The epoch statistics averaged over ranks (keys every rank reports)."""
        if self.world == 1:
            return stats
        every = distributed.all_gather_objects(stats)
        keys = [k for k in stats if all(k in s for s in every)]
        return {k: sum(s[k] for s in every) / len(every) for k in keys}

    def _evaluate(
        self, stage: Stage, done_epoch: int, lr: float | None, losses: dict[str, float], stats: dict[str, float], t0: float
    ) -> None:
        record: dict[str, Any] = {"epoch": done_epoch, "step": self.step, "lr": lr, "loss": losses, "stats": stats}
        if len(self.stages) > 1:
            record["stage"] = stage.name
        record.update(evaluate_algorithm(self.algorithm, self.config, self.datasets, self.eval_splits, self.device,
                                         self.eval_loaders))
        if stage.selectable:
            score = selection_score(self.config, record)
            key = selection_key(self.config, record)
            if self.best is None or key > selection_key(self.config, self.best["record"]):
                self.best = {"epoch": done_epoch, "score": score, "record": record}
                subsets = {s: [int(i) for i in sub] for s in self.eval_splits
                           if (sub := self.algorithm.evaluation_subset(s)) is not None}
                if self.main:
                    payload = best_payload(self.config, self.algorithm.model, self.datasets["train"], self.best,
                                           subsets)
                    self.folder.save_best(payload)
        record["seconds"] = time.time() - t0
        if self.main:
            self.folder.append_metrics(record)
        log.log(self.level, "%s", summary_line(self.name, done_epoch, self.total, record))

    def _checkpoint(self, done_epoch: int, optimizers: dict, schedulers: dict) -> None:
        if not self.main:
            return
        checkpoint: dict[str, Any] = {
            "epoch": done_epoch,
            "step": self.step,
            "elapsed": self.elapsed,
            "algorithm": self.algorithm.state_dict(),
        }
        if "model" in optimizers:
            checkpoint["optimizer"] = optimizers["model"].state_dict()
            checkpoint["scheduler"] = schedulers["model"].state_dict()
        others = [n for n in optimizers if n != "model"]
        if others:
            checkpoint["optimizers"] = {n: optimizers[n].state_dict() for n in others}
            checkpoint["schedulers"] = {n: schedulers[n].state_dict() for n in others}
        checkpoint["rng"] = rng_state()
        checkpoint["best"] = self.best
        if self.world > 1:
            checkpoint["world_size"] = self.world
        self.folder.save_checkpoint(checkpoint)


class StepModule(nn.Module):
    """The algorithm's training step as a module's forward, for DDP to wrap: returns the loss, keeps the whole
    :class:`StepOutput` in ``last``."""

    def __init__(self, algorithm: Algorithm) -> None:
        super().__init__()
        self.algorithm = algorithm
        self.last: StepOutput | None = None

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> torch.Tensor:
        self.last = self.algorithm.training_step(batch, ctx)
        return self.last.loss
