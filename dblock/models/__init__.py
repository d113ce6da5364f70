"""Whole networks (hidden layers + readout)."""

from dblock.models.classifier import MODELS, Output, SNNClassifier, get_layer

__all__ = ["MODELS", "Output", "SNNClassifier", "get_layer"]
