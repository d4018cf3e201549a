"""Fig. 2: UMAP of each run's latents coloured by label and by confounder (one row per run, titled with MMD_env).

When the split holds one environment (e.g. the test split of Spawrious-style benchmarks), the run's val split is
added (the same data as Fig. 3 and the audit)::

    python figures/fig2_umap_label_confounder.py runs/demo/erm runs/demo/groupdro runs/demo/ex2l --out docs/img/fig2_umap.png
"""

from __future__ import annotations

import sys

from common import main, parser

PARSER = parser(__doc__.splitlines()[0], "output PNG", umap=True)

if __name__ == "__main__":
    sys.exit(main("fig2", PARSER))
