"""TorchScript classifiers in the audit: Grad-CAM without forward hooks.

A TorchScript module runs its compiled graph and refuses Python forward hooks, so the usual way of reading a
layer's output (a hook) does not exist. :class:`ScriptedClassifier` reads it from the graph instead: it copies the
module's ``forward`` graph, inlines every call (each node keeps the path of the module it came from), and adds the
output of the LAST node that belongs to the chosen module as a second graph output. Running that graph returns the
logits and the layer's output from one pass, in one autograd graph, so ``d logits / d activation`` (Grad-CAM's
weights) is one ``torch.autograd.grad``. Tested to give the same CAMs as the eager model the file was scripted
from (tests/test_analysis_any_model.py).

Uses TorchScript's graph API (``torch._C``): TorchScript is in maintenance in PyTorch, and this adapter exists
so that models already saved that way can be audited.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ex2l_xai.errors import Ex2lError

log = logging.getLogger(__name__)

__all__ = ["ScriptedClassifier", "load_torchscript"]


def _path_of(hierarchy: str) -> str:
    """``SELF(ResNet).layer4(Sequential).1(BasicBlock).relu(ReLU).UNKNOWN_INSTANCE(...)`` -> ``layer4.1.relu``; a
    scripted ``nn.Sequential`` (its loop over children unrolled) has no leading ``SELF``: ``0(Conv2d).SELF(Conv2d)``
    -> ``0``."""
    parts = []
    tokens = hierarchy.split(".")
    if tokens and tokens[0].startswith("SELF("):
        tokens = tokens[1:]
    for token in tokens:
        name = token.split("(")[0]
        if name in ("SELF", "UNKNOWN_INSTANCE", ""):
            break
        parts.append(name)
    return ".".join(parts)


def _is_tensor(value: Any) -> bool:
    return value.type().kind() == "TensorType"


class ScriptedClassifier(nn.Module):
    """A TorchScript classifier (``torch.jit.load``'s result) whose layer outputs Grad-CAM can read.

    Parameters
    ----------
    script : the loaded ``torch.jit.ScriptModule``; its ``forward`` maps an image batch to label logits (or to a
        tuple whose first entry is).

    ``model(x)`` is ``script(x)``; :meth:`with_activation` also returns a layer's output. Module paths (``layer4``)
    are the script's own: this wrapper is transparent (``is_wrapper``).
    """

    is_wrapper = True

    def __init__(self, script: torch.jit.ScriptModule) -> None:
        super().__init__()
        if not isinstance(script, torch.jit.ScriptModule):
            raise Ex2lError(f"ScriptedClassifier: expected a torch.jit.ScriptModule, got {type(script).__name__}")
        self.inner = script
        self._functions: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Any:
        """The script's own forward."""
        return self.inner(x)

    def __deepcopy__(self, memo: dict[int, Any]) -> ScriptedClassifier:
        """A copy with its own weights (``copy.deepcopy`` of the script). The compiled graphs are shared: they take
        the module as an argument, and compiled functions cannot be copied."""
        import copy

        clone = ScriptedClassifier(copy.deepcopy(self.inner, memo))
        clone._functions = dict(self._functions)
        clone.train(self.training)
        return clone

    def _inlined(self) -> Any:
        graph = self.inner.forward.graph.copy()
        torch._C._jit_pass_inline(graph)
        return graph

    def _module_nodes(self, graph: Any) -> list[tuple[str, Any]]:
        """(module path, node) of every top-level node with one tensor output, in graph order."""
        out = []
        for node in graph.nodes():
            if node.outputsSize() == 1 and _is_tensor(node.output()):
                path = _path_of(node.getModuleHierarchy())
                if path:
                    out.append((path, node))
        return out

    def _compile(self, key: str, graph: Any, extra: Sequence[Any]) -> Any:
        """``graph`` with ``extra`` values as further outputs, as a function of (module, input). It is run with the
        graph executor's optimisations off (``torch.jit.optimized_execution(False)``, restored on exit): from its
        second call the optimised plan of a scripted ``nn.Sequential`` of convolutions and ReLUs returned the added
        activation outside the autograd graph of the logits ("the differentiated Tensor ... not used in the graph")."""
        for value in extra:
            graph.registerOutput(value)
        graph.makeMultiOutputIntoTuple()
        return torch._C._create_function_from_graph(f"ex2l_audit_{len(self._functions)}", graph)

    def with_activation(self, x: Tensor, layer: str) -> tuple[Any, Tensor]:
        """``(output, activation)``: the script's output and the output of module ``layer`` (a dotted path),
        from one pass of the graph."""
        fn = self._functions.get(layer)
        if fn is None:
            graph = self._inlined()
            nodes = [n for p, n in self._module_nodes(graph) if p == layer or p.startswith(layer + ".")]
            if not nodes:
                known = sorted({p.split(".")[0] for p, _ in self._module_nodes(self._inlined())})
                raise Ex2lError(
                    f"layer: {layer!r} produces no tensor in the TorchScript model's forward graph (modules seen at "
                    f"the top level: {', '.join(known)})"
                )
            fn = self._compile(layer, graph, [nodes[-1].output()])
            self._functions[layer] = fn
        with torch.jit.optimized_execution(False):  # see _compile: the optimised plan can cut the added output off
            out = fn(self.inner._c, x)
        return out[0], out[1]

    def feature_points(self, x: Tensor) -> list[Any]:
        """Each module's output in one pass of ``x`` (see :func:`analysis.modules.feature_points`), read from the
        graph: the last node of every module path, in graph order."""
        from analysis.modules import FeaturePoint, as_logits

        graph = self._inlined()
        last: dict[str, Any] = {}
        order: list[str] = []
        for path, node in self._module_nodes(graph):
            parts = path.split(".")
            for k in range(len(parts), 0, -1):  # the node closes every enclosing module too, outermost last
                prefix = ".".join(parts[:k])
                if prefix in last:
                    order.remove(prefix)
                last[prefix] = node
                order.append(prefix)
        fn = self._compile("<all>", graph, [last[p].output() for p in order])
        with torch.enable_grad(), torch.jit.optimized_execution(False):
            out = fn(self.inner._c, x)
            logits, acts = as_logits(out[0]), list(out[1:])
            grads = torch.autograd.grad(logits.sum(), acts, allow_unused=True)
        return [FeaturePoint(p, tuple(a.shape), g is not None, i)
                for i, (p, a, g) in enumerate(zip(order, acts, grads, strict=True))]


def load_torchscript(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ScriptedClassifier:
    """Load a TorchScript file (``torch.jit.save``) as a :class:`ScriptedClassifier`, or a clear error."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            script = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise Ex2lError(f"{path}: cannot load it as a TorchScript file ({str(exc).splitlines()[0]}); expected a "
                        "file written by torch.jit.save") from exc
    return ScriptedClassifier(script)
