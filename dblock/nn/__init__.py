"""Modules that own parameters (projection, beta, recurrent weights) and call functional/."""

from dblock.nn.layers import DBlockLayer, Decay, LeakyReadout, LIFLayer, Projection

__all__ = ["DBlockLayer", "Decay", "LIFLayer", "LeakyReadout", "Projection"]
