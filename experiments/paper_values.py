"""The paper's numbers (docs/model.md §7), read off the published figures: what our figures
compare with.

Keys are dblock's dataset config names (``nmnist``, ``shd``, ``ssc``); d-indexed values use
D_VALUES. ``None`` marks a value the paper does not give as a number.
"""

from __future__ import annotations

D_VALUES = (1, 10, 20, 30, 40)
NAMES = {"nmnist": "N-MNIST", "shd": "SHD", "ssc": "SSC"}  # as the paper names the datasets

# Fig. 4a: test accuracy (%) by recurrent (False: feedforward, True: recurrent) and d.
FIG4A = {
    "nmnist": {False: (93.8, 97.1, 97.5, 97.5, 95.7), True: (93.6, 96.9, 97.5, 97.6, 95.6)},
    "shd": {False: (66.2, 66.4, 68.9, 70.1, 69.4), True: (65.7, 73.5, 74.8, 75.7, 73.8)},
    "ssc": {False: (25.4, 33.5, 34.2, 34.9, 36.9), True: (25.4, 45.9, 51.3, 51.7, 49.9)},
}
# Fig. 4b: d = 40, recurrent; test accuracy (%) with detached / attached recurrent spikes.
FIG4B = {
    "nmnist": {True: 95.7, False: 96.1},
    "shd": {True: 73.4, False: 73.4},
    "ssc": {True: 49.8, False: 40.6},
}
# Fig. 4c: d = 40, recurrent; test accuracy (%) with 1 / 2 / 3 hidden layers.
FIG4C = {
    "nmnist": {1: 95.4, 2: 90.1, 3: 81.0},
    "shd": {1: 73.7, 2: 81.4, 3: 82.9},
    "ssc": {1: 49.6, 2: 60.2, 3: 59.3},
}
# Fig. 4d: whole-epoch training speedup over the standard recurrent SNN, by d.
FIG4D = {
    "nmnist": (5.0, 5.0, 4.0, 3.3, 2.7),
    "shd": (5.0, 7.0, 6.0, 5.2, 4.6),
    "ssc": (6.0, 9.2, 7.6, 6.3, 5.3),
}
# Fig. 4e: hidden spike reduction (%) vs the standard SNN, by d (N-MNIST d = 40: below 0).
FIG4E = {
    "nmnist": (80.0, 63.0, 59.0, 51.0, None),
    "shd": (84.0, 69.0, 63.0, 59.0, 59.0),
    "ssc": (93.0, 77.0, 73.0, 72.0, 51.0),
}

# Fig. 3a (feedforward, n = 100): speedup by d and t.
FIG3A = {
    5: {32: 1.6, 64: 3.2, 128: 6.7, 256: 9.6, 512: 13.7, 1024: 19, 2048: 21},
    10: {32: 1.1, 64: 2.3, 128: 4.2, 256: 8.2, 512: 15.6, 1024: 21, 2048: 26},
    30: {32: 0.4, 64: 0.9, 128: 1.8, 256: 3.6, 512: 8.0, 1024: 19, 2048: 33},
}
# Fig. 3a-d: the range of speedups over each panel's grid.
FIG3_RANGE = {"a": (0.40, 34.8), "b": (8.8, 15.6), "c": (0.49, 35.3), "d": (8.5, 16.2)}


def by_d(values: tuple | None) -> dict[int, float | None]:
    """A D_VALUES-indexed tuple as {d: value}; {} when the paper has no values."""
    return dict(zip(D_VALUES, values, strict=True)) if values else {}
