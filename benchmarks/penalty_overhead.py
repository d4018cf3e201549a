"""Cost of the eX2L penalty per training step: fused Grad-CAM path vs Captum's route vs two-head ERM.

Two backbones, random init, CPU, two threads: ResNet-18 at 64×64, batch 64 (CAM layers ``layer4`` and
``layer3``), and EfficientNet-Lite0 at 128×128, batch 32 (the pretrained regime's size; CAM layer ``layer4``, the
1280-channel map that feeds pooling). Each timed step is a full training step (forward, loss, backward, optimizer
step) of:

  erm      two-head ERM: CE(label) + CE(confounder)
  fused    the same + the Dice penalty on both heads' Grad-CAMs, from the one forward pass
           (ex2l_xai.cam.head_cams, default method="auto": the closed form W[target]/(hw) where the forward pass
           proves the CAM layer feeds pooling + linear (every ``layer4``), else the structured backward of
           ex2l_xai.cam_structured (ResNet ``layer3``))
  autograd the fused path with method="autograd": torch.autograd.grad(create_graph=True) per head, then the
           double backward (what "fused" measured before the structured path existed)
  captum   the same + the Dice penalty with CAMs from captum.attr.LayerGradCam(create_graph=True)
           (an extra forward pass per head, as the paper's implementation does)

All settings run interleaved (one step each, round robin) so drift hits all alike; the median of the timed
steps after warm-up is reported. The last line printed is one JSON object with the ratios
``<path>_over_erm_<layer>`` (median step over median ERM step) and ``<path>_over_erm_<layer>_paired`` (median
over rounds of each step over the ERM step of the same round, which cancels the slow and fast phases of a shared
machine); EfficientNet-Lite0's keys start with ``lite0_``.

    python benchmarks/penalty_overhead.py            # 20 timed steps each, all settings
    python benchmarks/penalty_overhead.py --quick    # 6 steps after 1, without "autograd"
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from torch.nn import functional as F

from ex2l_xai.cam import grad_cam, head_cams
from ex2l_xai.models import TwoHeadNet
from ex2l_xai.penalties import similarity

N_LABELS, N_CONF = 4, 6
#: backbone -> (image size, batch, CAM layers, key prefix)
BACKBONES = {
    "resnet18": (64, 64, ("layer4", "layer3"), ""),
    "efficientnet_lite0": (128, 32, ("layer4",), "lite0_"),
}


def make_step(path: str, layer: str, backbone: str = "resnet18", seed: int = 0):
    torch.manual_seed(seed)
    model = TwoHeadNet(backbone, N_LABELS, N_CONF, cam_layer=layer)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    lay_y, lay_c = model.cam_layers()

    def step(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        if path in ("fused", "autograd"):
            method = "auto" if path == "fused" else "autograd"
            res = head_cams(model, [lay_y, lay_c], x, [y, c], create_graph=True, method=method)
            out = res.output
            pen = similarity(res.cams[0], res.cams[1], "dice", "max").mean()
        else:
            out = model(x)
            pen = None
            if path == "captum":
                cam_y = grad_cam(lambda i: model(i).label, lay_y, x, y, backend="captum", create_graph=True)
                cam_c = grad_cam(lambda i: model(i).confounder, lay_c, x, c, backend="captum", create_graph=True)
                pen = similarity(cam_y, cam_c, "dice", "max").mean()
        loss = F.cross_entropy(out.label, y) + F.cross_entropy(out.confounder, c)
        if pen is not None:
            loss = loss + 0.1 * pen
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help="6 timed steps after 1 warm-up, no autograd path (under a minute here)"
    )
    ap.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 20, quick 6)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backbones", default=",".join(BACKBONES), help=f"comma-separated, of {list(BACKBONES)}")
    args = ap.parse_args()
    steps = args.steps or (6 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    paths = ("erm", "fused", "captum") if args.quick else ("erm", "fused", "autograd", "captum")
    torch.set_num_threads(args.threads)
    backbones = [b for b in args.backbones.split(",") if b]
    inputs = {}
    for b in backbones:
        size, batch = BACKBONES[b][:2]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, size, size, generator=g)
        y = torch.randint(0, N_LABELS, (batch,), generator=g)
        c = torch.randint(0, N_CONF, (batch,), generator=g)
        inputs[b] = (x, y, c)
    settings = [(b, p, layer) for b in backbones for layer in BACKBONES[b][2] for p in paths]
    fns = {s: make_step(s[1], s[2], s[0]) for s in settings}
    times: dict[tuple[str, str, str], list[float]] = {s: [] for s in settings}
    for i in range(warmup + steps):
        for s in settings:
            t0 = time.perf_counter()
            fns[s](*inputs[s[0]])
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[s].append(dt)
    med = {s: statistics.median(v) for s, v in times.items()}
    # the same steps, paired by round: each step over the ERM step of its round (a few seconds apart), so a slow
    # phase of a shared machine cancels out instead of landing on whichever setting it happened to hit
    paired = {
        (b, p, layer): statistics.median(a / e for a, e in zip(v, times[(b, "erm", layer)], strict=True))
        for (b, p, layer), v in times.items()
    }
    print(f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}, median of {steps} steps after {warmup}")
    print(f"{'backbone':19} {'size':>4} {'batch':>5} {'layer':8} {'path':8} {'median s/step':>14} {'x ERM':>7} "
          f"{'paired':>7}")
    result: dict[str, float | int | str] = {}
    for (b, p, layer), m in med.items():
        size, batch, _, prefix = BACKBONES[b]
        ratio = m / med[(b, "erm", layer)]
        print(f"{b:19} {size:4} {batch:5} {layer:8} {p:8} {m:14.4f} {ratio:7.3f} {paired[(b, p, layer)]:7.3f}")
        result[f"{prefix}{p}_seconds_{layer}"] = round(m, 5)
        if p != "erm":
            result[f"{prefix}{p}_over_erm_{layer}"] = round(ratio, 4)
            result[f"{prefix}{p}_over_erm_{layer}_paired"] = round(paired[(b, p, layer)], 4)
    result["steps"] = steps
    print(json.dumps(result))


if __name__ == "__main__":
    main()
