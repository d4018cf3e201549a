"""ERM: cross-entropy on the label, optionally with a confounder head trained alongside (two-head ERM)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor
from torch.nn import functional as F

from ex2l_xai.algorithms.base import Algorithm, Params, TrainInfo, register
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet, TwoHeadOutput


@dataclass
class ERMParams(Params):
    """``conf_weight`` > 0 adds ``conf_weight * CE(confounder head, c)`` (two-head ERM); ``conf_detach`` keeps
    that loss out of the shared backbone (the head then learns on fixed features, like a probe)."""

    conf_weight: float = 0.0
    conf_detach: bool = False

    def needs_confounder_head(self) -> bool:
        return self.conf_weight > 0

    def validate(self) -> None:
        if self.conf_weight < 0:
            raise ConfigError(f"algorithm.conf_weight: expected >= 0, got {self.conf_weight}")


def confounder_ce(model: TwoHeadNet, out: TwoHeadOutput, c: Tensor, detach: bool) -> Tensor:
    """CE of the confounder head; with ``detach`` on the shared latent, so it trains the head only."""
    if out.confounder is None or model.conf_head is None:
        raise ConfigError("algorithm needs a confounder head but the model has none")
    logits = model.conf_head(out.latent.detach()) if detach else out.confounder
    return F.cross_entropy(logits, c)


@register("erm")
class ERM(Algorithm):
    """Empirical risk minimisation on the label (plus the optional confounder head)."""

    Params = ERMParams

    def __init__(self, model: TwoHeadNet, params: ERMParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        if params.conf_detach and model.architecture == "dual":
            raise ConfigError("algorithm.conf_detach=true needs model.architecture=shared (dual trains its own backbone)")

    def loss(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, float]]:
        out = self.model(batch["image"])
        ce = F.cross_entropy(out.label, batch["label"])
        parts = {"ce": float(ce.detach())}
        loss = ce
        if self.params.conf_weight > 0:
            conf = confounder_ce(self.model, out, batch["confounder"], self.params.conf_detach)
            loss = loss + self.params.conf_weight * conf
            parts["conf_ce"] = float(conf.detach())
        parts["loss"] = float(loss.detach())
        return loss, parts
