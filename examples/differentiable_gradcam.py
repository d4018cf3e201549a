"""The eX2L penalty in your own training loop: ten lines around ``grad_cam``/``head_cams``.

Any network whose forward returns (label logits, confounder logits) works; here a torchvision ResNet-18 trunk
with two linear heads. Both CAMs come from the ONE forward pass the loss needs (no extra forward), and they
are differentiable, so the penalty trains the network.

    python examples/differentiable_gradcam.py [--steps 20]
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from ex2l_xai.cam import grad_cam, head_cams
from ex2l_xai.penalties import similarity


class TwoHeads(nn.Module):
    """A ResNet-18 trunk, a label head and a confounder head over the same pooled features."""

    def __init__(self, n_labels: int = 4, n_confounders: int = 6) -> None:
        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        self.trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
        self.label_head, self.conf_head = nn.Linear(512, n_labels), nn.Linear(512, n_confounders)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.trunk(x).mean((2, 3))
        return self.label_head(z), self.conf_head(z)


def main(argv: list[str] | None = None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lam", type=float, default=1.0, help="penalty weight")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    net = TwoHeads()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(16, 3, 64, 64)  # your batch ...
    y, c = torch.randint(0, 4, (16,)), torch.randint(0, 6, (16,))  # ... its labels and confounders
    cam_layer = net.trunk[-1]  # layer4
    history = []
    for step in range(args.steps):
        # --- the ten lines -------------------------------------------------------------------------------
        res = head_cams(net, [cam_layer, cam_layer], x, [y, c], create_graph=True)  # one forward, two CAMs
        label_logits, conf_logits = res.output
        penalty = similarity(res.cams[0], res.cams[1], kind="dice", norm="max").mean()
        loss = F.cross_entropy(label_logits, y) + F.cross_entropy(conf_logits, c) + args.lam * penalty
        opt.zero_grad()
        loss.backward()
        opt.step()
        # -----------------------------------------------------------------------------------------------
        history.append(float(penalty.detach()))
        print(f"step {step:3d}  loss {float(loss.detach()):.3f}  dice(label CAM, confounder CAM) {history[-1]:.3f}")
    # The same label CAM through Captum's LayerGradCam, for comparison (one extra forward pass):
    net.eval()
    ours = grad_cam(lambda i: net(i)[0], cam_layer, x, y)
    captum = grad_cam(lambda i: net(i)[0], cam_layer, x, y, backend="captum")
    print(f"fused vs Captum, max |difference|: {float((ours - captum).abs().max()):.2e}")
    return history


if __name__ == "__main__":
    main()
