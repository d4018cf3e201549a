"""Deep CORAL (Sun & Saenko 2016) as DomainBed implements it (``domainbed/algorithms.py``, classes
``AbstractMMD`` with ``gaussian=False`` and ``CORAL``; defaults from ``domainbed/hparams_registry.py``).

The loss is :class:`~ex2l_xai.algorithms.mmd.FeatureMatching`'s (mean environment risk plus ``gamma`` times the
mean pairwise discrepancy of the environments' pooled features, ``env`` from the dataset, at least two training
environments) with DomainBed's mean-and-covariance discrepancy

    D(x, y) = mean_d (mu_x - mu_y)_d^2 + mean_{d,d'} (C_x - C_y)_{d,d'}^2

where mu is the feature mean and C the unbiased feature covariance (divided by n - 1).
"""

from __future__ import annotations

from torch import Tensor

from ex2l_xai.algorithms.base import register
from ex2l_xai.algorithms.mmd import FeatureMatching


def coral_distance(x: Tensor, y: Tensor) -> Tensor:
    """Mean squared difference of the means plus that of the covariances of ``x`` (N, D) and ``y`` (M, D)."""
    mean_x, mean_y = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
    cent_x, cent_y = x - mean_x, y - mean_y
    cova_x = (cent_x.t() @ cent_x) / (len(x) - 1)
    cova_y = (cent_y.t() @ cent_y) / (len(y) - 1)
    return (mean_x - mean_y).pow(2).mean() + (cova_x - cova_y).pow(2).mean()


@register("coral")
class CORAL(FeatureMatching):
    """Matching the environments' feature means and covariances."""

    def discrepancy(self, x: Tensor, y: Tensor) -> Tensor:
        return coral_distance(x, y)
