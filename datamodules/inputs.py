"""datamodules.inputs."""

from __future__ import annotations

INPUTS = ("auto", "dense", "sparse")  # dataset.input: the batch format (datamodules/base.py)
