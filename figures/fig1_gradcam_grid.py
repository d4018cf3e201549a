"""Fig. 1: Grad-CAM overlay grid: rows = images, columns = the input and one column per run.

Rows are chosen by a seeded rule (the first run's worst groups by default; or where the runs disagree, or at
random); each cell is titled with the true label y, the prediction ŷ and the true confounder c::

    python figures/fig1_gradcam_grid.py runs/demo/erm runs/demo/groupdro runs/demo/ex2l --out docs/img/fig1_gradcam_grid.png
"""

from __future__ import annotations

import sys

from common import main, parser

PARSER = parser(__doc__.splitlines()[0], "output PNG", grid=True)

if __name__ == "__main__":
    sys.exit(main("fig1", PARSER))
