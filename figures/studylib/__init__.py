"""The study behind docs/results.md, in modules of one job each (``figures/study.py`` is its command line):

- :mod:`.regimes`: the sweeps as data (``sweeps/*.yaml``: preset, benchmarks, methods, seeds) and their loader;
- :mod:`.runner`: which run folders are missing, and training them through :mod:`ex2l_xai.launch`;
- :mod:`.aggregate`: one record per finished run (selection rules, oracle, diagnostics);
- :mod:`.stats`: mean ± std over seeds and paired differences with bootstrap intervals;
- :mod:`.tables`: the Markdown tables and the variant chosen on validation;
- :mod:`.docs`: rewriting a regime's section of docs/results.md between its markers.
"""
