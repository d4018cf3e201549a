"""Cost of the eX2L penalty per training step: fused Grad-CAM path vs Captum's route vs two-head ERM.

ResNet-18 (torchvision, random init), 64×64 inputs, batch 64, CPU, two threads. Each timed step is a full
training step (forward, loss, backward, optimizer step) of:

  erm      two-head ERM: CE(label) + CE(confounder)
  fused    the same + the Dice penalty on both heads' Grad-CAMs, from the one forward pass
           (ex2l_xai.cam.head_cams, default method="auto": the structured backward of ex2l_xai.cam_structured)
  autograd the fused path with method="autograd": torch.autograd.grad(create_graph=True) per head, then the
           double backward (what "fused" measured before the structured path existed)
  captum   the same + the Dice penalty with CAMs from captum.attr.LayerGradCam(create_graph=True)
           (an extra forward pass per head, as the paper's implementation does)

at the CAM layers ``layer4`` and ``layer3``. The eight settings run interleaved (one step each, round robin) so
drift hits all alike; the median of the timed steps after warm-up is reported. The last line printed is one
JSON object with the ratios ``<path>_over_erm_<layer>`` (median step over median ERM step) and
``<path>_over_erm_<layer>_paired`` (median over rounds of each step over the ERM step of the same round, which
cancels the slow and fast phases of a shared machine).

    python benchmarks/penalty_overhead.py            # 20 timed steps each, all eight settings
    python benchmarks/penalty_overhead.py --quick    # 6 steps after 1, without "autograd": under a minute here
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


def make_step(path: str, layer: str, seed: int = 0):
    torch.manual_seed(seed)
    model = TwoHeadNet("resnet18", N_LABELS, N_CONF, cam_layer=layer)
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
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    steps = args.steps or (6 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    paths = ("erm", "fused", "captum") if args.quick else ("erm", "fused", "autograd", "captum")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, N_LABELS, (args.batch,), generator=g)
    c = torch.randint(0, N_CONF, (args.batch,), generator=g)
    settings = [(p, layer) for layer in ("layer4", "layer3") for p in paths]
    fns = {s: make_step(*s) for s in settings}
    times: dict[tuple[str, str], list[float]] = {s: [] for s in settings}
    for i in range(warmup + steps):
        for s in settings:
            t0 = time.perf_counter()
            fns[s](x, y, c)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[s].append(dt)
    med = {s: statistics.median(v) for s, v in times.items()}
    # the same steps, paired by round: each step over the ERM step of its round (a few seconds apart), so a slow
    # phase of a shared machine cancels out instead of landing on whichever setting it happened to hit
    paired = {
        (p, layer): statistics.median(a / b for a, b in zip(v, times[("erm", layer)], strict=True))
        for (p, layer), v in times.items()
    }
    print(f"ResNet-18, {args.size}x{args.size}, batch {args.batch}, CPU ({platform.processor() or platform.machine()}),"
          f" {torch.get_num_threads()} threads, torch {torch.__version__}, median of {steps} steps after {warmup}")
    print(f"{'layer':8} {'path':8} {'median s/step':>14} {'x ERM':>7} {'paired':>7}")
    result: dict[str, float | int | str] = {}
    for (p, layer), m in med.items():
        ratio = m / med[("erm", layer)]
        print(f"{layer:8} {p:8} {m:14.4f} {ratio:7.3f} {paired[(p, layer)]:7.3f}")
        result[f"{p}_seconds_{layer}"] = round(m, 5)
        if p != "erm":
            result[f"{p}_over_erm_{layer}"] = round(ratio, 4)
            result[f"{p}_over_erm_{layer}_paired"] = round(paired[(p, layer)], 4)
    result["steps"] = steps
    print(json.dumps(result))


if __name__ == "__main__":
    main()
