"""Test-split diagnostics of a finished run (zero label CAMs, CAM mass in the object, label–confounder CAM overlap,
decision-level leak)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def measure_run(out: Path, max_samples: int = 800) -> dict[str, Any]:
    """Test-split diagnostics of a finished run: zero-CAM share, CAM mass in the object, label-confounder CAM
    overlap (Dice of max-normalised ReLU CAMs, where the model has a confounder head), decision-level leak."""
    import numpy as np
    import torch

    from analysis.localization import cam_mass_in_mask
    from analysis.probes import leakage
    from ex2l_xai.cam import head_cams
    from ex2l_xai.penalties import similarity
    from ex2l_xai.train import build_datasets, load_run_model

    model, config = load_run_model(out, device="cpu")
    model.eval()
    test = build_datasets(config)["test"]
    n = min(len(test), max_samples)
    idx = np.random.default_rng(0).permutation(len(test))[:n]
    has_conf = model.conf_head is not None
    logits, latents, labels, confs, zero, in_mask, overlap = [], [], [], [], [], [], []
    for start in range(0, n, 128):
        batch = [test[int(i)] for i in idx[start : start + 128]]
        x = torch.stack([b["image"] for b in batch])
        y = torch.tensor([b["label"] for b in batch])
        c = torch.tensor([b["confounder"] for b in batch])
        layers = model.cam_layers() if has_conf else model.cam_layers()[:1]
        res = head_cams(model, layers, x, [y, c] if has_conf else [y], create_graph=False)
        cam = res.cams[0]
        assert cam is not None
        logits.append(res.output.label.detach())
        latents.append(res.output.latent.detach())
        labels.append(y)
        confs.append(c)
        zero.append(cam.flatten(1).amax(1) <= 0)
        if has_conf:
            overlap.append(similarity(cam, res.cams[1], "dice", "max"))
        if "mask" in batch[0]:
            in_mask.append(cam_mass_in_mask(cam, torch.stack([b["mask"] for b in batch])))
    lg, lt = torch.cat(logits).numpy(), torch.cat(latents).numpy()
    lab, cf = torch.cat(labels).numpy(), torch.cat(confs).numpy()
    leak = leakage(lt, lab, cf, logits=lg, cv=3, seed=0)
    mass = torch.cat(in_mask) if in_mask else None
    return {
        "n": int(n),
        "zero_cam_share": float(torch.cat(zero).float().mean()),
        "cam_in_mask": None if mass is None else float(np.nanmean(mass.numpy())),
        "cam_overlap": float(torch.cat(overlap).mean()) if overlap else None,
        "logit_leak": leak.get("logit_leak"),
        "within_label_acc": leak.get("within_label_acc"),
        "chance": leak.get("within_label_chance"),
    }
