"""The trainer: ``train(config, out_dir)`` writes docs/architecture.md's run folder::

    config.yaml     the resolved configuration
    metrics.jsonl   one JSON object per evaluation: epoch, step, lr, loss (parts averaged over the epoch),
                    stats (the algorithm's epoch statistics), val, test[, oracle_val] (metrics dicts), seconds,
                    and stage (for algorithms of several stages: JTT, DFR)
    checkpoint.pt   latest state for resume (model + algorithm state, optimisers, schedulers, RNG states, best)
    best.pt         the selected model: {"model": state_dict, "epoch", "score", "selection", ...}
    results.json    {"algorithm", "dataset", "seed", "selection", "selected_epoch", "val", "test", ...}
    done            empty marker, written last

Both ``.pt`` files are written atomically and load with ``torch.load(..., weights_only=True)``. Rerunning on a
folder without ``done`` resumes from ``checkpoint.pt``; the shuffling of epoch ``e`` and every RNG the epoch uses
are seeded from ``(seed, e)``, so a resumed run ends exactly where an uninterrupted one does.

Under ``torchrun`` (``WORLD_SIZE`` > 1, a process group opened by :func:`ex2l_xai.distributed.process_group`, as
``ex2l train`` does) the same call trains one run with DistributedDataParallel: ``data.batch_size`` is the global
batch, rank 0 writes the folder and ``results.json`` gains ``world_size`` (docs/scaling.md).

The package has one module per job: :mod:`~ex2l_xai.train.builders` (device, datasets, model, algorithm,
optimiser, schedule), :mod:`~ex2l_xai.train.loaders` (data loaders and samplers, per rank under DDP),
:mod:`~ex2l_xai.train.rng`, :mod:`~ex2l_xai.train.evaluation`, :mod:`~ex2l_xai.train.rundir` (the run folder:
:class:`RunFolder`, the one reader and writer of its files, and loading a finished run),
:mod:`~ex2l_xai.train.syncbn` (global-batch batch norms for DDP) and :mod:`~ex2l_xai.train.loop`. The names below are the public API; import them from ``ex2l_xai.train``.
"""

from ex2l_xai.train.builders import (
    EVAL_SPLITS,
    CachedDataset,
    build_datasets,
    build_model,
    build_optimizer,
    build_run_algorithm,
    build_scheduler,
    build_split,
    dataset_kwargs,
    lr_factor,
    resolve_device,
    seed_everything,
    train_info,
)
from ex2l_xai.train.evaluation import Predictor, evaluate, evaluate_algorithm, predict_split, split_metrics
from ex2l_xai.train.loaders import eval_loader, to_device, train_loader
from ex2l_xai.train.loop import optimizer_step, train
from ex2l_xai.train.rundir import (
    RUN_FILES,
    RunFiles,
    RunFolder,
    load_best,
    load_run,
    load_run_config,
    load_run_model,
    read_metrics,
)

__all__ = [
    "EVAL_SPLITS",
    "RUN_FILES",
    "CachedDataset",
    "RunFiles",
    "RunFolder",
    "Predictor",
    "build_datasets",
    "build_split",
    "build_model",
    "build_optimizer",
    "build_run_algorithm",
    "build_scheduler",
    "dataset_kwargs",
    "eval_loader",
    "evaluate",
    "evaluate_algorithm",
    "load_best",
    "load_run",
    "load_run_config",
    "load_run_model",
    "lr_factor",
    "optimizer_step",
    "predict_split",
    "read_metrics",
    "resolve_device",
    "seed_everything",
    "split_metrics",
    "to_device",
    "train",
    "train_info",
    "train_loader",
]
