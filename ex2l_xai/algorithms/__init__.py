"""Registry of training algorithms: ``erm``, ``groupdro``, ``ex2l``."""

from ex2l_xai.algorithms import erm, ex2l, groupdro  # noqa: F401  (registration)
from ex2l_xai.algorithms.base import (
    ALGORITHMS,
    Algorithm,
    Params,
    TrainInfo,
    build_algorithm,
    group_ids,
    params_from_dict,
)

__all__ = ["ALGORITHMS", "Algorithm", "Params", "TrainInfo", "build_algorithm", "group_ids", "params_from_dict"]
