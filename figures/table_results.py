"""The main results table: test average and worst-group accuracy, mean ± std over seeds, one row per algorithm
(per dataset when runs of several datasets are given), from each run's results.json, as Markdown::

    python figures/table_results.py runs/*/ --out docs/results.md
"""

from __future__ import annotations

import sys

from common import main, parser

PARSER = parser(__doc__.splitlines()[0], "output Markdown file")

if __name__ == "__main__":
    sys.exit(main("table", PARSER))
