"""Loggers as run.py creates them from ``conf/logger/``."""

from __future__ import annotations

from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` without the ``anonymous`` argument it always hands to
    ``wandb.init``: wandb (>= 0.19) warns "The anonymous setting has no effect" for any value
    given, ``None`` included. ``anonymous=True`` is still passed on as given."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
