"""dblock: the d-block model and the standard SNN (PyTorch), trained with Lightning and Hydra.

``dblock.load_model(path)`` loads a trained network from a ``run.py`` checkpoint (see
``dblock.load``); the building blocks are in ``dblock.nn`` (layers), ``dblock.models``
(``SNNClassifier``) and ``dblock.functional`` (pure functions on tensors).
"""

__all__ = ["load_model"]


def __getattr__(name: str):
    # imported on first use: ``import dblock.config_check`` stays free of torch
    if name == "load_model":
        from dblock.load import load_model

        return load_model
    raise AttributeError(f"module 'dblock' has no attribute {name!r}")
