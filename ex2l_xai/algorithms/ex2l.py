"""eX2L: a label head and a confounder head, with a penalty on the overlap of their Grad-CAMs.

loss = CE(label head, y) + w_c · CE(confounder head, c) + λ(epoch) · mean_i P_i

``variant: paper`` is the paper's objective, P_i = sim(norm(CAM_y(x_i)), norm(CAM_c(x_i))) with a similarity of
:mod:`ex2l_xai.penalties`. ``variant: evidence`` is ours (see docs/concepts.md): P_i = Σ_p |CAM_y(x_i)|(p) ·
R_i(p), the absolute label evidence, in logit units, that lies in the confounder region R_i = max-normalised
ReLU(CAM_c(x_i)). With a linear head on globally pooled features Σ_p CAM_y(p) is the logit itself (minus the
bias), so the penalty cannot be met by killing the label CAM without losing the logit that CE asks for.

All CAMs of a step come from the training forward pass (:func:`ex2l_xai.cam.head_cams`). Every option that
decides whether the penalty is met or gamed is exposed: ``conf_detach`` (the confounder CE does not reach the
shared backbone), ``stop_grad: confounder`` (the penalty does not move the confounder CAM), ``label_cam_target``
(the label CAM at the true or the predicted class), ``label_cam_classes: all`` (every class's CAM is penalised,
so the decision cannot move to other classes' logits), ``cam_relu: false`` (signed CAMs), ``warmup_epochs``
(λ ramps linearly from 0). Each epoch logs the share of all-zero label CAMs, the gaming alarm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from ex2l_xai.algorithms.base import Algorithm, TrainInfo, register
from ex2l_xai.algorithms.erm import ERMParams, confounder_ce
from ex2l_xai.cam import head_cams
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.penalties import KINDS, NORMS, normalize, similarity


@dataclass
class Ex2lParams(ERMParams):
    """eX2L's options; the defaults are the variant chosen on validation (docs/results.md)."""

    CHOICES = {
        "variant": ("paper", "evidence"),
        "similarity": KINDS,
        "norm": NORMS,
        "label_cam_target": ("true", "pred"),
        "label_cam_classes": ("target", "all"),
        "stop_grad": ("none", "confounder"),
    }

    conf_weight: float = 1.0
    variant: str = "paper"
    penalty_weight: float = 0.1
    warmup_epochs: int = 0
    similarity: str = "dice"
    norm: str = "max"
    label_cam_target: str = "true"
    label_cam_classes: str = "target"
    cam_relu: bool = True
    stop_grad: str = "none"

    def needs_confounder_head(self) -> bool:
        return True

    def validate(self) -> None:
        super().validate()
        for key, choices in self.CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"algorithm.{key}: expected one of {list(choices)}, got {getattr(self, key)!r}")
        if self.penalty_weight < 0:
            raise ConfigError(f"algorithm.penalty_weight: expected >= 0, got {self.penalty_weight}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"algorithm.warmup_epochs: expected >= 0, got {self.warmup_epochs}")

    def lam(self, epoch: int) -> float:
        """λ at ``epoch`` (0-based): a linear ramp from 0 over ``warmup_epochs``, then ``penalty_weight``."""
        if self.warmup_epochs <= 0:
            return self.penalty_weight
        return self.penalty_weight * min(1.0, epoch / self.warmup_epochs)


def _select(cams: Tensor, target: Tensor) -> Tensor:
    """The (B, h, w) slice of all-class CAMs (B, C, h, w) at one class per sample."""
    return cams[torch.arange(cams.shape[0], device=cams.device), target]


def zero_share(cams: Tensor) -> Tensor:
    """Number of label CAMs with no positive value (ReLU'd map all zero)."""
    return (cams.detach().flatten(1).amax(1) <= 0).sum()


@register("ex2l")
class Ex2l(Algorithm):
    """eX2L with every option of DESIGN.md and the loophole-closing variants of the study."""

    Params = Ex2lParams

    def __init__(self, model: TwoHeadNet, params: Ex2lParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        if model.conf_head is None:
            raise ConfigError("algorithm ex2l needs a confounder head: the model was built without one")
        if params.conf_detach and model.architecture == "dual":
            raise ConfigError("algorithm.conf_detach=true needs model.architecture=shared (dual trains its own backbone)")
        self._zero = 0
        self._seen = 0
        self._pen_sum = 0.0
        self._batches = 0

    def penalty(self, label_cam: Tensor, conf_cam: Tensor) -> Tensor:
        """Per-sample penalty P_i (B,) of the chosen variant; ``label_cam`` may be (B, C, h, w) for all classes."""
        p = self.params
        if p.stop_grad == "confounder":
            conf_cam = conf_cam.detach()
        maps = label_cam.unbind(1) if label_cam.dim() == 4 else (label_cam,)
        if p.variant == "paper":
            return torch.stack([similarity(m, conf_cam, p.similarity, p.norm) for m in maps]).mean(0)
        region = normalize(F.relu(conf_cam), "max")
        return torch.stack([(m.abs() * region).flatten(1).sum(1) for m in maps]).mean(0)

    def loss(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, float]]:
        p = self.params
        x, y, c = batch["image"], batch["label"], batch["confounder"]
        lam = p.lam(epoch)
        label_target = "all" if p.label_cam_classes == "all" else ("pred" if p.label_cam_target == "pred" else y)
        label_relu = p.cam_relu and p.variant == "paper"
        res = head_cams(
            self.model,
            self.model.cam_layers(),
            x,
            [label_target, c],
            create_graph=lam > 0,
            retain_graph=True,
            relu=[label_relu, p.cam_relu or p.variant == "evidence"],
        )
        out = res.output
        ce = F.cross_entropy(out.label, y)
        conf = confounder_ce(self.model, out, c, p.conf_detach)
        loss = ce + p.conf_weight * conf
        label_cam, conf_cam = res.cams
        assert label_cam is not None and conf_cam is not None
        pen = self.penalty(label_cam, conf_cam).mean()
        if lam > 0:
            loss = loss + lam * pen
        # gaming alarm: label CAMs (at the class the loss looks at) with no positive evidence left
        target_cls = out.label.detach().argmax(1) if p.label_cam_target == "pred" else y
        at_target = _select(label_cam, target_cls) if label_cam.dim() == 4 else label_cam
        n_zero = int(zero_share(at_target))
        self._zero += n_zero
        self._seen += y.shape[0]
        self._pen_sum += float(pen.detach())
        self._batches += 1
        parts = {
            "ce": float(ce.detach()),
            "conf_ce": float(conf.detach()),
            "penalty": float(pen.detach()),
            "lambda": lam,
            "zero_cam": n_zero / y.shape[0],
            "loss": float(loss.detach()),
        }
        return loss, parts

    def epoch_stats(self) -> dict[str, float]:
        stats = {}
        if self._seen:
            stats = {"zero_cam_share": self._zero / self._seen, "penalty_mean": self._pen_sum / self._batches}
        self._zero = self._seen = self._batches = 0
        self._pen_sum = 0.0
        return stats
