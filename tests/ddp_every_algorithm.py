"""Run under ``torchrun --nproc_per_node 2`` by tests/test_ddp.py: every registered algorithm trains one tiny run
with DDP (gloo) into ``<out>/<name>``, through the Python API inside :func:`ex2l_xai.distributed.process_group`.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_every_algorithm.py OUT``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TINY  # noqa: E402

from ex2l_xai import distributed  # noqa: E402
from ex2l_xai.algorithms import ALGORITHMS  # noqa: E402
from ex2l_xai.config import load_config  # noqa: E402
from ex2l_xai.train import train  # noqa: E402

# options that keep each algorithm's special steps inside a 1-epoch tiny run
EXTRA = {
    "dfr": ["algorithm.fit_steps=20", "algorithm.select_every=10"],
    "jtt": ["algorithm.identify_epochs=1", "algorithm.upweight=sample", "algorithm.lambda_up=3"],
    "dann": ["algorithm.mlp_width=16"],  # alternates discriminator and model steps
    "irm": ["algorithm.anneal_steps=1"],  # its Adam reset happens inside the run
    "vrex": ["algorithm.anneal_steps=1"],
}
# eX2L cases that reach DDP's corner cases: a confounder branch without its own CE (unused parameters while lambda
# is 0), the gradmask double backward through every batch norm after layer1, a frozen cached prefix
EX2L_CASES = {
    "ex2l_no_conf_ce": ["algorithm.conf_weight=0", "algorithm.warmup_epochs=1", "train.epochs=2"],
    "ex2l_gradmask": ["algorithm.variant=gradmask", "algorithm.grad_at=layer1"],
    "ex2l_frozen_cached": ["model.freeze=layer1", "model.cache_frozen=true"],
}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    cases = {name: [f"algorithm.name={name}", *EXTRA.get(name, [])] for name in sorted(ALGORITHMS)}
    cases.update({name: ["algorithm.name=ex2l", *o] for name, o in EX2L_CASES.items()})
    with distributed.process_group("gloo"):
        assert distributed.world_size() == 2, "run me under torchrun --nproc_per_node 2"
        for name, overrides in cases.items():
            train(load_config("quick", [*TINY, *overrides]), out / name, quiet=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
