"""eX2L: a label head and a confounder head, with a penalty on the overlap of their Grad-CAMs.

loss = CE(label head, y) + w_c · CE(confounder head, c) + λ(epoch) · mean_i P_i

``variant: paper`` is the paper's objective, P_i = sim(norm(CAM_y(x_i)), norm(CAM_c(x_i))) with a similarity of
:mod:`ex2l_xai.penalties`. ``variant: evidence`` is ours (see docs/concepts.md): P_i = Σ_p |CAM_y(x_i)|(p) ·
R_i(p), the absolute label evidence, in logit units, that lies in the confounder region R_i = max-normalised
ReLU(CAM_c(x_i)). With a linear head on globally pooled features Σ_p CAM_y(p) is the logit itself (minus the
bias), so the penalty cannot be met by killing the label CAM without losing the logit that CE asks for.
``variant: gradmask`` (RRR, Ross et al. 2017; GALS, Petryk et al. 2022, with the confounder head instead of a human
mask saying where the confounder lives) penalises where the label decision looks in the INPUT (or at an early
stage, ``grad_at``), where receptive fields cannot carry the background into object cells: P_i = Σ_p R_i(p) ·
S_i(p) / Σ_p S_i(p), the share of the saliency S_i = Σ_channels (∂ log p(y_i | x_i) / ∂ F_i)² that lies in the
confounder region R_i (the max-normalised confounder CAM upsampled to F's size, detached); a share, so it cannot
be met by flattening every gradient.

``variant: channel`` (ours) compares the two heads' explanations in CHANNEL space instead of image space: which
features each head's decision reads, not where they lie. The channel evidence of a head at its target t is
e_i = ∂z_t/∂f_i ⊙ f_i over the pooled latent f_i (B, K) both heads read; for a linear head on globally pooled
features it is W[t] ⊙ f_i, the Grad-CAM map summed over space channel by channel (Grad-CAM's channel weight times
the channel's pooled activation), and Σ_k e_ik is the logit minus its bias. P_i = Σ_k ReLU(e^y_ik) · R_ik /
Σ_k ReLU(e^y_ik), the share of the label's positive evidence carried by the channels the confounder head reads,
R_i = max-normalised ReLU(e^c_i), detached; a share, so it cannot be met by shrinking the logit. It needs one
shared backbone (channels of two backbones are not the same features); with ``conf_detach`` the confounder head is
a probe of the label backbone's features that does not teach it the background.

``anchor_weight`` > 0 adds Singh et al. (2020)'s regulariser: anchor_weight · mean_p |mm(CAM_y) − mm(CAM*_y)|
(and the same for the confounder CAM when the anchor has a confounder head), where mm is min-max normalisation of
the signed CAM and CAM* the CAM of a frozen copy of the model as it was when training started (so start from a
trained model: ``model.init_from``). With ``similarity: product, norm: minmax, cam_relu: false`` the penalty is
their overlap mean_p mm(CAM_y) · mm(CAM_c), which, unlike a ReLU'd map, cannot go all zero; their setting was
0.1 overlap + 0.01 anchor on an ImageNet-pretrained ResNet-50 fine-tuned from the standard classifier.

All CAMs of a step come from the training forward pass (:func:`ex2l_xai.cam.head_cams`). Every option that
decides whether the penalty is met or gamed is exposed: ``conf_detach`` (the confounder CE does not reach the
shared backbone), ``stop_grad: confounder`` (the penalty does not move the confounder CAM), ``label_cam_target``
(the label CAM at the true or the predicted class), ``label_cam_classes: all`` (every class's CAM is penalised,
so the decision cannot move to other classes' logits), ``cam_relu: false`` (signed CAMs), ``warmup_epochs``
(λ ramps linearly from 0). Each epoch logs the share of all-zero label CAMs, the gaming alarm.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ex2l_xai.algorithms.base import Algorithm, TrainInfo, register
from ex2l_xai.algorithms.erm import ERMParams, confounder_ce
from ex2l_xai.cam import VARIANTS, capture_activations, head_cams, upsample
from ex2l_xai.errors import ConfigError
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.penalties import KINDS, NORMS, normalize, similarity


@dataclass
class Ex2lParams(ERMParams):
    """eX2L's options. The defaults are the paper's objective (Dice of max-normalised ReLU CAMs, λ = 0.1), the
    first study's validation choice (from scratch, the ``quick`` preset). The ``pretrained`` preset ships its own
    regime's validation choice over m2m_hard and the calibrated benchmark: ``variant="channel"``, λ = 0.1,
    ``conf_detach=True`` on one backbone (docs/results.md; two-step recipes such as Singh et al.'s, which validation
    favours for their extra training, do not compete)."""

    CHOICES = {
        "variant": ("paper", "evidence", "gradmask", "channel"),
        "similarity": KINDS,
        "norm": NORMS,
        "label_cam_target": ("true", "pred"),
        "label_cam_classes": ("target", "all"),
        "stop_grad": ("none", "confounder"),
        "cam_variant": VARIANTS,
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
    anchor_weight: float = 0.0
    grad_at: str = "input"
    cam_variant: str = "gradcam"

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
        if self.anchor_weight < 0:
            raise ConfigError(f"algorithm.anchor_weight: expected >= 0, got {self.anchor_weight}")

    def lam(self, epoch: int) -> float:
        """λ at ``epoch`` (0-based): a linear ramp from 0 over ``warmup_epochs``, then ``penalty_weight``."""
        if self.warmup_epochs <= 0:
            return self.penalty_weight
        return self.penalty_weight * min(1.0, epoch / self.warmup_epochs)


def _select(cams: Tensor, target: Tensor) -> Tensor:
    """The (B, h, w) slice of all-class CAMs (B, C, h, w) at one class per sample."""
    # gather, not cams[arange, target]: advanced indexing's backward is not deterministic on a multi-threaded CPU
    index = target.view(-1, 1, 1, 1).expand(-1, 1, *cams.shape[2:])
    return cams.gather(1, index).squeeze(1)


def channel_evidence(head: nn.Module, latent: Tensor, target: Tensor, *, create_graph: bool) -> Tensor:
    """Channel evidence (B, K) of ``head``'s logit at ``target``: gradient × input at the pooled latent,
    ∂z_t/∂f ⊙ f; for a linear head W[t] ⊙ f, the Grad-CAM map summed over space per channel. Differentiable
    (with ``create_graph``) in the head's weights and, where ``latent`` carries a graph, in the backbone's."""
    f = latent if latent.requires_grad else latent.detach().requires_grad_(True)
    logit = head(f).gather(1, target.view(-1, 1)).sum()
    (grad,) = torch.autograd.grad(logit, f, create_graph=create_graph)
    return grad * f


def zero_share(cams: Tensor) -> Tensor:
    """Number of label CAMs with no positive value (ReLU'd map all zero)."""
    return (cams.detach().flatten(1).amax(1) <= 0).sum()


@register("ex2l")
class Ex2l(Algorithm):
    """eX2L with every option of docs/concepts.md and the loophole-closing variants of the study."""

    Params = Ex2lParams

    def __init__(self, model: TwoHeadNet, params: Ex2lParams, info: TrainInfo) -> None:
        super().__init__(model, params, info)
        if model.conf_head is None:
            raise ConfigError("algorithm ex2l needs a confounder head: the model was built without one")
        if params.conf_detach and model.architecture == "dual":
            raise ConfigError("algorithm.conf_detach=true needs model.architecture=shared (dual trains its own backbone)")
        if params.variant == "channel" and model.architecture != "shared":
            raise ConfigError("algorithm.variant=channel needs model.architecture=shared: the channels of two "
                              "backbones are not the same features")
        if params.variant == "gradmask" and params.grad_at != "input":
            try:
                model.backbone.get_submodule(params.grad_at)
            except AttributeError as exc:
                raise ConfigError(
                    f"algorithm.grad_at: expected input or a module of the backbone (layer1, layer2, ...), "
                    f"got {params.grad_at!r}"
                ) from exc
        self.anchor: TwoHeadNet | None = None
        if params.anchor_weight > 0:
            # the model as training starts (after model.init_from), frozen: Singh et al.'s reference CAMs
            # (a deep copy shares the model's prefix cache: the same frozen prefix, one cache serves both)
            self.anchor = copy.deepcopy(model).requires_grad_(False).eval()
        self._zero = 0
        self._seen = 0
        self._pen_sum = 0.0
        self._batches = 0

    def train(self, mode: bool = True) -> Ex2l:
        """As ``nn.Module.train``; the anchor stays in eval mode (its batch norms must not move)."""
        super().train(mode)
        if self.anchor is not None:
            self.anchor.eval()
        return self

    def ddp_find_unused_parameters(self) -> bool:
        """Without a confounder CE (``conf_weight`` 0) the confounder branch is reached only by the penalty, which
        is off while λ is 0 (warm-up) or cut by ``stop_grad``: DDP must then look for unused parameters."""
        return self.params.conf_weight == 0

    def penalty(self, label_cam: Tensor, conf_cam: Tensor) -> Tensor:
        """Per-sample penalty P_i (B,) of the CAM variants; ``label_cam`` may be (B, C, h, w) for all classes."""
        p = self.params
        if p.stop_grad == "confounder":
            conf_cam = conf_cam.detach()
        maps = label_cam.unbind(1) if label_cam.dim() == 4 else (label_cam,)
        if p.variant == "paper":
            return torch.stack([similarity(m, conf_cam, p.similarity, p.norm) for m in maps]).mean(0)
        region = normalize(F.relu(conf_cam), "max")
        return torch.stack([(m.abs() * region).flatten(1).sum(1) for m in maps]).mean(0)

    def gradmask_penalty(self, logits: Tensor, y: Tensor, where: Tensor, conf_cam: Tensor) -> Tensor:
        """Per-sample share of the label log-probability's saliency at ``where`` (the input or an early stage's
        output, (B, C, H, W)) that lies in the confounder region."""
        logp = F.log_softmax(logits, 1).gather(1, y[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, where, create_graph=True)
        sal = grad.pow(2).sum(1)  # (B, H, W)
        region = upsample(normalize(F.relu(conf_cam.detach()), "max"), tuple(sal.shape[-2:]))
        return (region * sal).flatten(1).sum(1) / (sal.flatten(1).sum(1) + 1e-12)

    def channel_penalty(self, latent: Tensor, y: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample share of the label's positive channel evidence in the confounder's channels (B,), and the
        number of samples whose label evidence has no positive channel (the gaming alarm)."""
        label_ev = channel_evidence(self.model.label_head, latent, y, create_graph=True)
        assert self.model.conf_head is not None
        conf_ev = channel_evidence(self.model.conf_head, latent.detach(), c, create_graph=False).detach()
        region = normalize(F.relu(conf_ev).unsqueeze(1), "max").squeeze(1)
        pos = F.relu(label_ev)
        share = (pos * region).sum(1) / (pos.sum(1) + 1e-12)
        return share, (pos.detach().amax(1) <= 0).sum()

    def channel_loss(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, float]]:
        """The loss of ``variant: channel`` (no spatial CAM is needed: one forward pass)."""
        p = self.params
        x, y, c = batch["image"], batch["label"], batch["confounder"]
        lam = p.lam(epoch)
        out = self.model(x)
        ce = F.cross_entropy(out.label, y)
        conf = confounder_ce(self.model, out, c, p.conf_detach)
        pen, n_zero = self.channel_penalty(out.latent, y, c)
        pen = pen.mean()
        loss = ce + p.conf_weight * conf + (lam * pen if lam > 0 else 0.0)
        return loss, self._log_parts(ce, conf, pen, lam, int(n_zero), y.shape[0], loss)

    def _log_parts(self, ce: Tensor, conf: Tensor, pen: Tensor, lam: float, n_zero: int, n: int,
                   loss: Tensor) -> dict[str, float]:
        """Accumulate the epoch statistics and return the step's loss parts for the logs."""
        self._zero += n_zero
        self._seen += n
        self._pen_sum += float(pen.detach())
        self._batches += 1
        return {"ce": float(ce.detach()), "conf_ce": float(conf.detach()), "penalty": float(pen.detach()),
                "lambda": lam, "zero_cam": n_zero / n, "loss": float(loss.detach())}

    def anchor_term(self, x: Tensor, targets: list[Tensor], cams: tuple[Tensor | None, ...]) -> Tensor:
        """mean_p |mm(CAM) - mm(CAM of the anchor)| over the label CAM (and the confounder CAM, when both have
        one), per sample (B,); CAMs signed, min-max normalised (Singh et al. 2020)."""
        assert self.anchor is not None
        heads = len([c for c in cams if c is not None]) if self.anchor.conf_head is not None else 1
        ref = head_cams(
            self.anchor, self.anchor.cam_layers()[:heads], x, targets[:heads], create_graph=False, relu=False,
            variant=self.params.cam_variant,  # type: ignore[arg-type]
        )
        terms = []
        for cam, r in zip(cams[:heads], ref.cams, strict=True):
            assert cam is not None and r is not None
            terms.append((normalize(cam, "minmax") - normalize(r, "minmax")).abs().flatten(1).mean(1))
        return torch.stack(terms).sum(0)

    def loss(self, batch: dict[str, Tensor], epoch: int) -> tuple[Tensor, dict[str, float]]:
        p = self.params
        if p.variant == "channel":
            return self.channel_loss(batch, epoch)
        x, y, c = batch["image"], batch["label"], batch["confounder"]
        lam = p.lam(epoch)
        gradmask = p.variant == "gradmask"
        label_target = "all" if p.label_cam_classes == "all" else ("pred" if p.label_cam_target == "pred" else y)
        anchored = self.anchor is not None and p.anchor_weight > 0
        # CAMs come signed; each term applies the ReLU it needs (ReLU of the signed map is Grad-CAM's map)
        label_relu = p.cam_relu and p.variant == "paper"
        conf_relu = p.cam_relu or p.variant in ("evidence", "gradmask")
        if gradmask and lam > 0 and p.grad_at == "input":
            x = x.detach().requires_grad_(True)
        grad_layers = [self.model.backbone.get_submodule(p.grad_at)] if gradmask and p.grad_at != "input" else []
        with capture_activations(grad_layers) as early:
            res = head_cams(
                self.model,
                self.model.cam_layers(),
                x,
                [label_target, c],
                create_graph=(lam > 0 and not gradmask) or anchored,
                retain_graph=True,
                relu=False,
                variant=p.cam_variant,  # type: ignore[arg-type]
            )
        out = res.output
        ce = F.cross_entropy(out.label, y)
        conf = confounder_ce(self.model, out, c, p.conf_detach)
        loss = ce + p.conf_weight * conf
        signed_label, signed_conf = res.cams
        assert signed_label is not None and signed_conf is not None
        label_cam = F.relu(signed_label) if label_relu else signed_label
        conf_cam = F.relu(signed_conf) if conf_relu else signed_conf
        if gradmask:
            where = x if p.grad_at == "input" else early[0]
            pen = self.gradmask_penalty(out.label, y, where, conf_cam) if lam > 0 else torch.zeros(())
            pen = pen.mean()
        else:
            pen = self.penalty(label_cam, conf_cam).mean()
        if lam > 0:
            loss = loss + lam * pen
        parts = {}
        if anchored:
            label_t = signed_label if signed_label.dim() == 3 else _select(signed_label, y)
            anchor = self.anchor_term(x.detach(), [y, c], (label_t, signed_conf)).mean()
            loss = loss + p.anchor_weight * anchor
            parts["anchor"] = float(anchor.detach())
        # gaming alarm: label CAMs (at the class the loss looks at) with no positive evidence left
        target_cls = out.label.detach().argmax(1) if p.label_cam_target == "pred" else y
        at_target = _select(label_cam, target_cls) if label_cam.dim() == 4 else label_cam
        n_zero = int(zero_share(F.relu(at_target)))  # as the ReLU'd map: no positive evidence
        parts.update(self._log_parts(ce, conf, pen, lam, n_zero, y.shape[0], loss))
        return loss, parts

    def epoch_stats(self) -> dict[str, float]:
        stats = {}
        if self._seen:
            stats = {"zero_cam_share": self._zero / self._seen, "penalty_mean": self._pen_sum / self._batches}
        self._zero = self._seen = self._batches = 0
        self._pen_sum = 0.0
        return stats
