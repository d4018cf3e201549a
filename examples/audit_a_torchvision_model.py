"""Audit a plain torchvision classifier for spurious reliance, in a few lines of the Python API.

In practice: load your own checkpoint into the model and pass your dataset (any dataset whose samples carry
``label`` and ``confounder``: the ``csv`` dataset reads your folder + CSV). Here the ResNet-18 is randomly
initialised and the dataset is the built-in benchmark, so the script runs anywhere.

    python examples/audit_a_torchvision_model.py --out runs/audit_resnet18
"""

from __future__ import annotations

import argparse

import torchvision

from analysis.audit import AuditTarget
from analysis.report import audit
from ex2l_xai.data import get_dataset


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/audit_resnet18")
    ap.add_argument("--max-samples", type=int, default=400)
    ap.add_argument("--per-group", type=int, default=60)
    args = ap.parse_args(argv)

    model = torchvision.models.resnet18(num_classes=4)  # e.g. model.load_state_dict(torch.load("mine.pt"))
    data = {"challenge": "m2m_hard", "per_group": args.per_group, "image_size": 64}
    test = get_dataset("synthetic", "test", **data)  # the split to audit (one environment)
    val = get_dataset("synthetic", "val", **data)  # two training environments, for MMD across environments
    target = AuditTarget(model, name="my ResNet-18", dataset=test, layer=model.layer4, env_dataset=val)
    result = audit([target], args.out, max_samples=args.max_samples, quiet=True)

    entry, leak = result["runs"][0], result["runs"][0]["leakage"]
    print(f"report: {result['report']}")
    print(f"test accuracy {entry['avg_acc']:.3f}, worst group {entry['worst_group_acc']:.3f}")
    print(f"background from the latents within each label: {leak['within_label_acc']:.3f} "
          f"(chance {leak['within_label_chance']:.3f}; a random network of the same kind: "
          f"{leak['random_within_label_acc']:.3f}); from the logits (decision-level leak): {leak['logit_leak']:.3f}")
    print(f"label-CAM mass inside the object: {entry['cam_in_mask']:.3f}; MMD across environments: "
          f"{entry['mmd_env']:.4f}")
    return result


if __name__ == "__main__":
    main()
