"""Benchmarks and figure scripts, run from the repo root as modules (``python -m
experiments.bench_speed``, ``python -m experiments.plot_fig4 ...``). They never train except by
running ``run.py`` as a user does. A script imports only the shared modules, which are not
scripts (no ``__main__`` block; ``tests/test_imports.py`` checks it): ``bench_impls``
(implementations, the training step, timing and counting one call), ``points`` (the Fig. 3 grids,
the input data, the whole-step scope's batches), ``dispatch_count`` (ops and bytes),
``figtools`` (tables, plots, wandb) and ``paper_values`` (the paper's numbers).
"""
