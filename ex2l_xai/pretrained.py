"""Library weights fetched over the network (timm's hub, torchvision's URLs), with one clear error offline.

:func:`fetch_pretrained` runs a loader that may download and turns a network failure (no connection, DNS, HTTP
error, a hub in offline mode, a file missing from the local cache) into ONE line: what could not be fetched, why
(the first line of the library's message) and the offline route (``--weights FILE`` for the audit, a state-dict
path for training). Other errors (an unknown model name, a bad argument) pass through unchanged.
:func:`library_model` builds ``timm:NAME`` or a torchvision model name with or without its pretrained weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from ex2l_xai.errors import Ex2lError

T = TypeVar("T")
OFFLINE_ROUTE = "--weights FILE (a state dict saved where the weights can be downloaded)"

__all__ = ["OFFLINE_ROUTE", "download_error", "fetch_pretrained", "library_model", "network_errors"]


def network_errors() -> tuple[type[BaseException], ...]:
    """The exception types a failed download raises: OSError (urllib, requests, huggingface_hub's HTTP, offline
    and cache-miss errors all derive from it) and httpx's transport errors where httpx is installed."""
    kinds: list[type[BaseException]] = [OSError]
    try:
        import httpx

        kinds.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover - httpx comes with huggingface_hub
        pass
    return tuple(kinds)


def download_error(source: str, exc: BaseException, *, offline: str = OFFLINE_ROUTE) -> Ex2lError:
    """The one-line error for weights of ``source`` that could not be downloaded."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return Ex2lError(
        f"{source}: cannot download the pretrained weights (no network? {type(exc).__name__}: {reason}); "
        f"offline, pass {offline}"
    )


def fetch_pretrained(load: Callable[[], T], source: str, *, offline: str = OFFLINE_ROUTE) -> T:
    """``load()``, with a network failure raised as :func:`download_error` (one line naming ``offline``)."""
    try:
        return load()
    except network_errors() as exc:
        raise download_error(source, exc, offline=offline) from exc


def library_model(name: str, *, pretrained: bool = False, offline: str = OFFLINE_ROUTE) -> nn.Module:
    """``timm:NAME`` (any timm model) or a torchvision model name (``resnet18``, ``torchvision:resnet18``), with the
    library's default pretrained weights when ``pretrained`` (downloaded or from the library's cache; offline, the
    one-line error of :func:`download_error`), else randomly initialised. An unknown name is an Ex2lError."""
    if name.startswith("timm:"):
        import timm

        arch = name[len("timm:") :]
        if not timm.is_model(arch):
            raise Ex2lError(f"model {name!r}: timm has no model {arch!r}")
        return fetch_pretrained(lambda: timm.create_model(arch, pretrained=pretrained), name, offline=offline)
    import torchvision

    arch = name.removeprefix("torchvision:")
    if arch not in torchvision.models.list_models():
        raise Ex2lError(f"model {name!r}: expected timm:NAME or a torchvision model name")
    weights = "DEFAULT" if pretrained else None
    return fetch_pretrained(lambda: torchvision.models.get_model(arch, weights=weights), name, offline=offline)
