"""Train GroupDRO without confounder labels: infer them from an ERM run, then train on the inferred groups.

GroupDRO (and eX2L's confounder head) need a confounder per training image. When nobody labelled one, a first
stage infers it: an ERM run's latents are clustered beside the label (``ex2l infer-confounders``), and the second
stage trains on that table (``data.confounders``). The built-in benchmark knows its true backgrounds, so this
script also prints how well the inferred confounders recover them (ARI) and the test worst-group accuracy, which
is always taken on the true groups.

    python examples/train_without_confounder_labels.py --out runs/no_labels

The same from the command line::

    ex2l train -c quick --set algorithm.name=erm --out runs/no_labels/erm
    ex2l infer-confounders runs/no_labels/erm --out runs/no_labels/inferred.csv
    ex2l train -c quick --set algorithm.name=groupdro --set data.confounders=runs/no_labels/inferred.csv \\
        --out runs/no_labels/groupdro_inferred
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from analysis.infer_confounders import infer_confounders, write_inferred
from ex2l_xai.config import load_config
from ex2l_xai.train import train


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for the two runs and the confounder table")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--per-group", type=int, default=40, help="training images per (class, background)")
    args = p.parse_args(argv)
    out = Path(args.out)
    data = [f"data.options.per_group={args.per_group}", "data.options.challenge=m2m_hard",
            "data.options.minority_fraction=0.1", f"train.epochs={args.epochs}"]

    erm = train(load_config("quick", [*data, "algorithm.name=erm"]), out / "erm", quiet=True)
    frames, report = infer_confounders(out / "erm")
    table = write_inferred(out / "inferred_confounders.csv", frames, report)
    print(f"inferred {report['k']} confounders from ERM's latents; against the true backgrounds: "
          f"ARI {report['splits']['train']['ari']:.2f} (train), {report['splits']['val']['ari']:.2f} (val)")

    dro = train(load_config("quick", [*data, "algorithm.name=groupdro", f"data.confounders={table}"]),
                out / "groupdro_inferred", quiet=True)
    for name, res in (("erm", erm), ("groupdro on inferred confounders", dro)):
        print(f"{name}: test average {res['test']['avg_acc']:.3f}, worst group {res['test']['worst_group_acc']:.3f}")
    return {"erm": erm, "groupdro_inferred": dro, "report": report}


if __name__ == "__main__":
    main()
