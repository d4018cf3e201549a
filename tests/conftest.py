import os

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def analysis_runs(tmp_path_factory: pytest.TempPathFactory):
    """``make(algorithm, seed=0)``: the shared tiny run of the analysis tests (trained once per session)."""
    from helpers import tiny_run

    base = tmp_path_factory.getbasetemp() / "analysis_runs"
    return lambda algorithm, seed=0: tiny_run(base, algorithm, seed)
