"""A Hydra callback for sweeps that share one folder (the Fig. 4 sweeps, ``conf/sweep/fig4.yaml``).

Hydra writes each sweep's config to ``<sweep dir>/multirun.yaml``, replacing the one of the sweep
before (4d's sweep runs into 4a's folder). Before a sweep starts, this callback renames the
previous file ``multirun-<its date>.yaml``, so every sweep's config is kept. Hydra calls the
hooks by name; the class needs neither hydra nor omegaconf.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)


class KeepSweepConfigs:
    """Keep one ``multirun*.yaml`` per sweep in a shared sweep folder."""

    def on_multirun_start(self, config, **kwargs) -> None:
        path = Path(str(config.hydra.sweep.dir)) / "multirun.yaml"
        if not path.is_file():
            return
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(path.stat().st_mtime))
        target, n = path.with_name(f"multirun-{stamp}.yaml"), 1
        while target.exists():
            n += 1
            target = path.with_name(f"multirun-{stamp}-{n}.yaml")
        os.replace(path, target)
        log.info("kept the previous sweep's config as %s", target)

    # the other hooks Hydra calls: nothing to do
    def on_multirun_end(self, config, **kwargs) -> None:
        pass

    def on_run_start(self, config, **kwargs) -> None:
        pass

    def on_run_end(self, config, **kwargs) -> None:
        pass

    def on_job_start(self, config, **kwargs) -> None:
        pass

    def on_job_end(self, config, job_return, **kwargs) -> None:
        pass
