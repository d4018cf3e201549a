"""Batch norm over the global batch under DDP.

With DDP each rank sees ``batch_size / world_size`` samples; a plain batch norm would normalise with the
statistics of that shard, so a 2-process run would not compute what a 1-process run of the same global batch
computes. :func:`sync_batchnorm` replaces every trainable batch norm of a module by :class:`GlobalBatchNorm`, whose
training statistics are those of the global batch: the per-channel sum (with the sample count), then the centred
sum of squares, are all-reduced over ranks (two passes, as a one-process batch norm computes them) through
:func:`ex2l_xai.distributed.all_reduce_sum`, differentiably, so the gradient is that of the global batch too. In
eval mode, or in one process, it is ``nn.BatchNorm``.

Why not ``torch.nn.SyncBatchNorm``: it refuses CPU tensors (so the gloo runs and tests could not use it), and its
backward is not itself differentiable, while eX2L's ``gradmask`` variant differentiates the input gradient, which
passes through every batch norm after ``grad_at``, a second time. :class:`GlobalBatchNorm` is made of
differentiable operations on every device. timm's ``BatchNormAct2d`` (EfficientNet-Lite0: a batch norm followed by
its own dropout and activation modules) becomes :class:`GlobalBatchNormAct`, the same with global statistics (timm's
``SyncBatchNormAct`` would refuse CPU tensors and has no second derivative either).

Weights, buffers and state-dict keys stay those of the original layers (the same tensors are moved over), so
checkpoints load into a plain :class:`~ex2l_xai.models.TwoHeadNet`; a batch norm shared by two parents (tied
frozen stages) is replaced by one module in both. Frozen batch norms (weights without gradient, kept in eval mode)
are left as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ex2l_xai.distributed import all_reduce_sum, is_active
from ex2l_xai.errors import ConfigError

__all__ = ["GlobalBatchNorm", "GlobalBatchNormAct", "sync_batchnorm"]

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training-mode statistics are the global batch's across ranks (any device; in one
    process, or in eval mode, it is ``nn.BatchNorm``)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_active()):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        c = x.shape[1]
        local = torch.cat([x.sum(dims), x.new_tensor([float(x.numel() // c)])])
        sums = all_reduce_sum(local, differentiable=True)
        mean, count = sums[:c] / sums[c], sums[c].detach()
        centred = x - mean.view(shape)
        var = all_reduce_sum(centred.pow(2).sum(dims), differentiable=True) / count
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            assert self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (count / (count - 1).clamp_min(1))
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class GlobalBatchNormAct(GlobalBatchNorm):
    """timm's ``BatchNormAct2d`` over the global batch: :class:`GlobalBatchNorm`, then the original layer's
    ``drop`` and ``act`` modules (parameter-free, so the state-dict keys are the original's)."""

    def __init__(self, num_features: int, eps: float, momentum: float | None, affine: bool,
                 track_running_stats: bool, *, drop: nn.Module, act: nn.Module) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.drop, self.act = drop, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def _replacement(bn: _BatchNorm) -> nn.Module:
    from timm.layers import BatchNormAct2d

    if isinstance(bn, (nn.SyncBatchNorm, GlobalBatchNorm)):
        return bn
    args = (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if type(bn) is BatchNormAct2d:
        new: GlobalBatchNorm = GlobalBatchNormAct(*args, drop=bn.drop, act=bn.act)
    elif type(bn) in _PLAIN:
        new = GlobalBatchNorm(*args)
    else:
        raise ConfigError(
            f"DDP: batch norm {type(bn).__module__}.{type(bn).__name__} has no global-batch version here (torch's "
            "BatchNorm1d/2d/3d and timm's BatchNormAct2d have: small_cnn, resnet18, resnet50, efficientnet_lite0); "
            "freeze the stages that hold it (model.freeze)"
        )
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
    new.train(bn.training)
    return new


def sync_batchnorm(module: nn.Module) -> int:
    """Replace, in place, every batch norm of ``module`` that is not frozen (a frozen one, with weights that get no
    gradient, runs in eval mode: no batch statistics) by its global-batch version (the same on every device);
    returns how many modules were replaced."""
    done: dict[int, nn.Module] = {}
    for parent in list(module.modules()):
        for name, child in list(parent._modules.items()):
            if not isinstance(child, _BatchNorm):
                continue
            frozen = child.weight is not None and not child.weight.requires_grad
            if frozen:
                continue
            if id(child) not in done:
                done[id(child)] = _replacement(child)
            parent._modules[name] = done[id(child)]
    return sum(1 for old, new in done.items() if id(new) != old)
