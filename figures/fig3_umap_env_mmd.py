"""Fig. 3: UMAP of each run's latents coloured by environment, each panel titled with MMD_env (lower = more
domain-invariant latents)::

    python figures/fig3_umap_env_mmd.py runs/demo/erm runs/demo/groupdro runs/demo/ex2l --out docs/img/fig3_umap_env.png
"""

from __future__ import annotations

import sys

from common import main, parser

PARSER = parser(__doc__.splitlines()[0], "output PNG", umap=True)

if __name__ == "__main__":
    sys.exit(main("fig3", PARSER))
