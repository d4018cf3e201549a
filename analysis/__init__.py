"""The analysis layer: audit any torch classifier for spurious reliance.

Entry points (each module's docstring has the details)::

    from analysis.extract import extract          # latents, logits, Grad-CAMs of a model over a dataset
    from analysis.report import audit             # report.html + audit.json + figures/ for runs or models
    from analysis.settings import AuditSettings   # every audit option and its default, once
    from analysis.adapter import ModelAdapter     # one model, resolved once: forward, CAM layers, latent, kind
    from analysis.checks import Check, register   # the audit's checks: one module each in analysis/checks/
    from analysis.overlays import gradcam_grid    # Fig. 1: Grad-CAM overlay grid
    from analysis.embeddings import embedding_figure  # Figs. 2-3: UMAP of latents by label/confounder/env
    from analysis.mmd import mmd_env              # MMD across environments
    from analysis.probes import leakage           # linear-probe confounder leakage
    from analysis.localization import localization_summary  # CAM vs masks, label vs confounder overlap
    from analysis.interventions import interventions  # background swaps: only-FG/BG, mixed-same/rand, BG-gap
    from analysis.sanity import cam_sanity        # CAM sanity check by cascading randomisation
    from analysis.loading import load_model       # torchvision/timm + state dict, TorchScript; Normalized
    from analysis.datasets import AuditDataset    # plain (image, label) datasets; FolderDataset: images + CSV

Layout: ``adapter`` resolves a model once (on ``modules``: CAM layer, cascade order, re-initialisation of any
nn.Module; and ``scripted``: TorchScript); ``extract`` makes one pass through it over ``datasets``; ``audit`` prepares
one model and runs the ``checks`` (one module each, one loop), ``report`` orchestrates the whole audit with one
``settings.AuditSettings``, ``html`` + ``templates/`` render it, ``overlays``, ``embeddings`` and ``causal_plots``
draw the figures (on their own ``Figure`` objects, via ``plotting``); ``tables`` and ``paper`` make the paper's
table and figures from run folders.

This package may import ``ex2l_xai``; ``ex2l_xai`` never imports it (``ex2l_xai/cli.py`` aside).
"""

from ex2l_xai.errors import Ex2lError


class AnalysisError(Ex2lError, ValueError):
    """Bad input to an analysis function (wrong shape, mismatched lengths, ...). An :class:`Ex2lError`, so the
    CLI prints it as one line; also a ``ValueError``, as numerical code conventionally raises."""


__all__ = ["AnalysisError"]
