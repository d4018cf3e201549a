"""One adapter per audited model: what every check needs to know about a model, resolved once.

:class:`ModelAdapter` answers, for a run folder's ``TwoHeadNet``, a torchvision/timm classifier (optionally wrapped
in :class:`analysis.loading.Normalized`) and a TorchScript file alike:

* the forward pass to the label logits (and the confounder logits where the model has a confounder head);
* the CAM layer(s): the label head's, and the confounder head's for a two-head model (:meth:`bind` resolves them
  once, on an example batch: a transformer's by :func:`ex2l_xai.cam_layers.transformer_cam_layer`, its tokens
  laid out as a map by :func:`~ex2l_xai.cam_layers.auto_reshape`; else :func:`analysis.modules.find_cam_layer`);
* the latent the probes and UMAP read (:class:`LatentReader`);
* the input normalisation and what kind of model it is (``kind``: ``run``, ``two_head``, ``module`` or
  ``torchscript``), for the report;
* one batch's logits, latents and CAMs of a chosen variant (:meth:`batch`), the label logits (:meth:`logits`) and
  the CAM of any variant at any class (:meth:`cams`, for the faithfulness checks), the Grad-CAM of any copy of the model at the same layer
  (:func:`layer_gradcam`, for the sanity check), and the random-weights baseline (:meth:`random_baseline`, with a
  :meth:`latent_fingerprint` so that models of one architecture share one baseline).

The branches on the model's type live here and in :mod:`analysis.modules` (module navigation) only: no check
asks what a model is.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from analysis.modules import (
    as_logits,
    find_cam_layer,
    module_path,
    prepare_input,
    random_copy,
    resolve_module,
    scripted_of,
    unwrap,
)
from ex2l_xai.cam import cam_from_activations, grad_cam, head_cams
from ex2l_xai.cam_layers import Reshape, auto_reshape, transformer_cam_layer
from ex2l_xai.errors import Ex2lError

__all__ = ["CamLayers", "LatentReader", "LatentSpec", "ModelAdapter", "layer_gradcam"]

LatentSpec = Callable[[Tensor], Tensor] | nn.Module | str | None
PRETTY = {"erm": "ERM", "groupdro": "GroupDRO", "ex2l": "eX2L", "irm": "IRM", "jtt": "JTT", "dfr": "DFR"}


@dataclass
class CamLayers:
    """The CAM layers: the label head's, the confounder head's (the same module without one), whether the model
    gives confounder CAMs (``two_head``), and the label layer's module path."""

    label: nn.Module
    conf: nn.Module
    two_head: bool
    path: str
    reshape: Reshape | None = None


def layer_gradcam(model: nn.Module, layer: str, x: Tensor, y: Tensor) -> Tensor:
    """Grad-CAM (B, h, w) of the label logits at ``y``, at module path ``layer`` of ``model`` (any copy of the audited
    model: a TorchScript model through its graph, any other through a forward hook; token and channels-last
    layers laid out by the model's own :func:`~ex2l_xai.cam_layers.auto_reshape`)."""
    scripted = scripted_of(model)
    if scripted is not None:
        out, act = scripted.with_activation(prepare_input(model, x), layer)
        return cam_from_activations(act, as_logits(out), y)
    target = resolve_module(model, layer, "layer")
    return grad_cam(lambda t: as_logits(model(t)), target, x, y, reshape=auto_reshape(unwrap(model), target))


def _two_head_net(model: nn.Module) -> bool:
    from ex2l_xai.models import TwoHeadNet

    return isinstance(model, TwoHeadNet)


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in unwrap(model).modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


class LatentReader:
    """Where the pooled latent comes from (``latent_fn`` of :func:`analysis.extract.extract`) and how to read it per
    batch: the input of a module (a forward pre-hook), the global average pool of the CAM layer, a callable, or the
    ``latent`` of a ``TwoHeadOutput``."""

    def __init__(self, adapter: ModelAdapter, latent_fn: LatentSpec, layers: CamLayers) -> None:
        model = adapter.model
        self.pre_hooked: nn.Module | None = None
        self.call: Callable[[Tensor], Tensor] | None = None
        self.pool = False
        scripted = adapter.scripted is not None
        if scripted and latent_fn not in (None, "pool"):
            raise Ex2lError("latent_fn: a TorchScript model's latent is the global average pool of its CAM layer "
                            "(latent_fn=None or 'pool')")
        if latent_fn is None:
            if scripted:
                self.pool = True
            elif not (adapter.two_head_net and adapter.forward_fn is None):
                self.pre_hooked = model.label_head if adapter.two_head_net else _last_linear(model)
                self.pool = self.pre_hooked is None
        elif isinstance(latent_fn, str) and latent_fn == "pool":
            self.pool = True
        elif isinstance(latent_fn, (nn.Module, str)):
            self.pre_hooked = resolve_module(model, latent_fn, "latent_fn")
        elif callable(latent_fn):
            self.call = latent_fn
        else:
            raise Ex2lError(
                f"latent_fn: expected None, 'pool', a module, a module path or a callable, got {latent_fn!r}")
        if self.pool:
            self.description = f"global average pool of {layers.path}"
        elif self.pre_hooked is not None:
            self.description = f"input of {module_path(model, self.pre_hooked)}"
        else:
            self.description = "latent_fn" if self.call is not None else "TwoHeadOutput.latent"
        self.layer = layers.label
        self.hooked_layer = self.pool and not scripted
        self.captured: dict[str, Tensor] = {}

    def hooks(self) -> list[Any]:
        """Register the hooks the latent needs (the caller removes them)."""
        handles = []
        if self.pre_hooked is not None:
            def pre_hook(_m: nn.Module, inputs: tuple[Any, ...]) -> None:
                self.captured["z"] = inputs[0]

            handles.append(self.pre_hooked.register_forward_pre_hook(pre_hook))
        if self.hooked_layer:
            def act_hook(_m: nn.Module, _i: Any, output: Tensor) -> None:
                self.captured["a"] = output

            handles.append(self.layer.register_forward_hook(act_hook))
        return handles

    def read(self, out: Any, x: Tensor, activation: Tensor | None = None) -> Tensor:
        """The (B, D) latent of the batch ``x`` whose model output is ``out``."""
        if self.pre_hooked is not None:
            return self.captured["z"].flatten(1)
        if self.pool:
            a = activation if activation is not None else self.captured["a"]
            return a.mean(dim=tuple(range(2, a.dim())))
        if self.call is not None:
            with torch.no_grad():
                return self.call(x).flatten(1)
        z = getattr(out, "latent", None)
        if not isinstance(z, Tensor):
            raise Ex2lError("latent_fn: the model output has no .latent; pass latent_fn= (a module or 'pool')")
        return z


class _Forward:
    """The model as ``forward_fn`` for ``head_cams``: returns (label, conf?, label, latent) in that order."""

    def __init__(self, fn: Callable[[Tensor], Any], two_head: bool, latent: LatentReader):
        self.fn, self.two_head, self.latent = fn, two_head, latent

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.fn(x)
        label = as_logits(out)
        z = self.latent.read(out, x)
        if self.two_head:
            return label, out.confounder, label, z
        return label, label, z


class ModelAdapter:
    """One audited model, resolved once (see the module docstring).

    Parameters
    ----------
    model : the classifier (a ``torch.jit.ScriptModule`` is wrapped in
        :class:`~analysis.scripted.ScriptedClassifier`).
    name : display name (default: the model's class name).
    layer : CAM layer (module or module path); default the model's own (a TwoHeadNet's ``cam_layers()``) or
        :func:`~analysis.modules.find_cam_layer` on the first example batch.
    forward_fn : maps an input batch to the model output (default: the model).
    latent_fn : see :func:`analysis.extract.extract`.
    device : where to run it (the model is moved when given); default the model's own device.
    info : how the model was loaded (``kind``, ``weights``, ``normalization``, ``source``), reported as is.
    config, run : the run's configuration and folder (:meth:`from_run`).
    """

    def __init__(self, model: nn.Module, *, name: str | None = None, layer: nn.Module | str | None = None,
                 forward_fn: Callable[[Tensor], Any] | None = None, latent_fn: LatentSpec = None,
                 device: str | torch.device | None = None, info: dict[str, Any] | None = None,
                 config: Any = None, run: Path | None = None) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            from analysis.scripted import ScriptedClassifier

            model = ScriptedClassifier(model)
        if not isinstance(model, nn.Module):
            raise Ex2lError(f"model_or_run: expected a run folder or a torch.nn.Module, got {type(model).__name__}")
        if device is not None:
            model.to(device)
        self.model, self.layer_spec, self.forward_fn, self.latent_fn = model, layer, forward_fn, latent_fn
        self.scripted = scripted_of(model)
        self.two_head_net = _two_head_net(model)
        self.name = name or type(unwrap(model)).__name__
        self.info = dict(info or {})
        self.config, self.run = config, run
        self.device = next((p.device for p in model.parameters()), torch.device(device or "cpu"))
        self._layers: CamLayers | None = None
        self._latent: LatentReader | None = None

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run: str | os.PathLike[str], device: str | torch.device | None = None,
                 name: str | None = None, **options: Any) -> ModelAdapter:
        """The selected model (``best.pt``) of a run folder written by ``ex2l train`` (``options``: ``layer``,
        ``forward_fn``, ``latent_fn`` as for the constructor)."""
        from ex2l_xai.train import load_run_model

        path = Path(run)
        model, config = load_run_model(path, device or "cpu")
        name = name or PRETTY.get(config.algorithm_name.lower(), config.algorithm_name)
        return cls(model, name=name, config=config, run=path, **options)

    @property
    def kind(self) -> str:
        """``run`` (a run folder), ``torchscript``, ``two_head`` (a TwoHeadNet object) or ``module``."""
        if self.run is not None:
            return "run"
        if self.scripted is not None:
            return "torchscript"
        return "two_head" if self.two_head_net else "module"

    @property
    def normalization(self) -> Any:
        """The input normalisation of a model trained elsewhere (None: inside the model, or none)."""
        return self.info.get("normalization")

    # ---- layers and latent ---------------------------------------------------------------------------------
    def bind(self, example: Tensor) -> CamLayers:
        """Resolve the CAM layer(s) and the latent once (``example``: a batch of the audited images)."""
        if self._layers is not None:
            return self._layers
        model, layer = self.model, self.layer_spec
        two_head = self.two_head_net and model.conf_head is not None and layer is None
        if self.two_head_net and layer is None:
            label_layer, conf_layer = model.cam_layers()
        else:
            if layer is not None:
                label_layer = resolve_module(model, layer, "layer")
            else:
                label_layer = self._transformer_layer() or find_cam_layer(model, example if self.forward_fn is None
                                                                          else None)
            conf_layer = label_layer
        if self.scripted is not None and self.forward_fn is not None:
            raise Ex2lError("forward_fn: not supported for a TorchScript model (its CAMs come from its own graph)")
        reshape = auto_reshape(unwrap(model), label_layer) if self.scripted is None else None
        self._layers = CamLayers(label_layer, conf_layer, two_head, module_path(model, label_layer), reshape)
        self._latent = LatentReader(self, self.latent_fn, self._layers)
        return self._layers

    def _transformer_layer(self) -> nn.Module | None:
        """A timm ViT's or Swin's CAM layer (:func:`~ex2l_xai.cam_layers.transformer_cam_layer`), or None for any
        other model (a TorchScript model's layers come from its graph)."""
        if self.scripted is not None:
            return None
        try:
            return transformer_cam_layer(unwrap(self.model))[1]
        except Ex2lError:
            return None

    @property
    def layers(self) -> CamLayers:
        """The CAM layers (after :meth:`bind`)."""
        if self._layers is None:
            raise Ex2lError("ModelAdapter: call bind(example) before reading its layers")
        return self._layers

    @property
    def latent(self) -> LatentReader:
        """The latent reader (after :meth:`bind`)."""
        self.layers  # noqa: B018 - raises before bind
        assert self._latent is not None
        return self._latent

    @property
    def layer_path(self) -> str:
        """Module path of the label CAM layer."""
        return self.layers.path

    @property
    def has_confounder_head(self) -> bool:
        """Whether the model gives confounder logits and CAMs."""
        return self.layers.two_head

    @property
    def recomputable_cams(self) -> str | None:
        """None when the CAMs of a copy of the model can be recomputed at :attr:`layer_path` (the sanity check),
        else why not."""
        return "not run for a model with a custom forward_fn" if self.forward_fn is not None else None

    # ---- the pass ------------------------------------------------------------------------------------------
    def hooks(self) -> list[Any]:
        """Register the hooks one pass needs (the caller removes them)."""
        return self.latent.hooks() if self.scripted is None else []

    def label_fn(self) -> Callable[[Tensor], Any]:
        """The function whose output holds the label logits (``forward_fn`` or the model)."""
        return self.forward_fn or self.model

    def batch(self, x: Tensor, y: Tensor, c: Tensor, cams: bool, variant: str = "gradcam"
              ) -> dict[str, Tensor | None]:
        """One batch: ``logits`` (and ``conf_logits``), ``latents``, and with ``cams`` the label CAMs (``variant``,
        :mod:`ex2l_xai.cam_variants`) at y (``cams_true``) and at ŷ (``cams_pred``) and, with a confounder head, its
        CAM at c (``cams_conf``)."""
        if self.scripted is not None:
            return self._scripted_batch(x, y, cams, variant)
        layers, latent = self.layers, self.latent
        fwd = _Forward(self.label_fn(), layers.two_head, latent)
        res: dict[str, Tensor | None] = {}
        if cams:
            layer_list = [layers.label, layers.conf, layers.label] if layers.two_head else [layers.label] * 2
            targets: list[Any] = [y, c, "pred"] if layers.two_head else [y, "pred"]
            hc = head_cams(fwd, layer_list, x, targets, create_graph=False, retain_graph=False, variant=variant,
                           reshape=layers.reshape)
            out = hc.output
            res["cams_true"], res["cams_pred"] = hc.cams[0], hc.cams[-1]
            if layers.two_head:
                res["cams_conf"] = hc.cams[1]
        else:
            with torch.no_grad():
                out = fwd(x)
        res["logits"] = out[0]
        if layers.two_head:
            res["conf_logits"] = out[1]
        res["latents"] = out[-1]
        return res

    def _scripted_batch(self, x: Tensor, y: Tensor, cams: bool, variant: str = "gradcam"
                        ) -> dict[str, Tensor | None]:
        """A TorchScript model: the CAM layer's activation comes out of the graph itself."""
        res: dict[str, Tensor | None] = {}
        xin = prepare_input(self.model, x)
        with torch.set_grad_enabled(cams):
            out, act = self.scripted.with_activation(xin.requires_grad_(cams), self.layer_path)
            logits = as_logits(out)
            if cams:
                res["cams_true"] = cam_from_activations(act, logits, y, retain_graph=True, variant=variant)
                res["cams_pred"] = cam_from_activations(act, logits, logits.detach().argmax(1), retain_graph=False,
                                                        variant=variant)
        res["logits"] = logits
        res["latents"] = self.latent.read(out, x, act)
        return res

    def logits(self, x: Tensor) -> Tensor:
        """The label logits of the batch ``x`` (no gradients)."""
        with torch.no_grad():
            return as_logits(self.label_fn()(x))

    def cams(self, x: Tensor, target: Tensor, variant: str = "gradcam") -> Tensor:
        """The label CAMs (B, h, w) of ``variant`` at classes ``target``, at the label CAM layer (after :meth:`bind`;
        detached)."""
        layers = self.layers
        if self.scripted is not None:
            with torch.enable_grad():
                out, act = self.scripted.with_activation(prepare_input(self.model, x), self.layer_path)
                return cam_from_activations(act, as_logits(out), target, variant=variant)
        fn = self.label_fn()
        return grad_cam(lambda t: as_logits(fn(t)), layers.label, x, target, variant=variant,
                        reshape=layers.reshape)

    # ---- the random-weights baseline -----------------------------------------------------------------------
    def random_baseline(self, seed: int = 0, dataset: Any = None) -> ModelAdapter:
        """The same architecture with random weights, reading its latent the same way: for a run, the run's own
        initialisation (same config and seed, ``pretrained`` ignored; heads sized by ``dataset``); else
        :func:`analysis.modules.random_copy` under ``seed``."""
        if self.config is not None:
            from ex2l_xai.train import build_model

            cfg = copy.deepcopy(self.config)
            cfg.model.pretrained = "none"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = build_model(cfg, dataset.n_labels, dataset.n_confounders)
            model.eval()
            return ModelAdapter(model, name=f"{self.name} (random)", device=self.device, config=cfg)
        clone = random_copy(self.model, seed)
        layer = self.layer_path if self._layers is not None else _same_path(self.model, clone, self.layer_spec)
        return ModelAdapter(clone, name=f"{self.name} (random)", layer=layer,
                            latent_fn=_same_path(self.model, clone, self.latent_fn))

    def latent_fingerprint(self) -> str | None:
        """A digest of what this model's latent depends on (the architecture and the weights of the modules that
        feed it, and how it is read), after :meth:`bind`: equal digests give equal latents on equal images, so a
        random baseline is extracted once per architecture and seed, not once per model. None (never shared)
        for a latent read by a user's callable or through a custom ``forward_fn``."""
        if self.latent.call is not None or self.forward_fn is not None:
            return None
        h = hashlib.sha256()
        body = self.model.backbone if self.two_head_net and self.latent.pre_hooked is None else self.model
        h.update(f"{self.latent.description}|{self.layer_path}|{body!r}".encode())
        for key, t in body.state_dict().items():
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


def _same_path(model: nn.Module, clone: nn.Module, spec: Any) -> Any:
    """Map a module of ``model`` to the module at the same path in its copy ``clone`` (strings pass through)."""
    if not isinstance(spec, nn.Module):
        return spec
    for path, m in model.named_modules():
        if m is spec:
            return clone.get_submodule(path) if path else clone
    return spec
