"""Benchmarks and figure scripts, run from the repo root as modules (``python -m
experiments.bench_speed``, ``python -m experiments.plot_fig4 ...``). They never train except by
running ``run.py`` as a user does; the shared code lives in ``bench_impls`` (implementations,
the training step), ``dispatch_count`` (ops and bytes), ``figtools`` (tables, plots, wandb) and
``paper_values`` (the paper's numbers).
"""
