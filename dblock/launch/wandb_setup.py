"""Weights & Biases without an account: the ``dblock.wandb_offline`` resolver that
conf/logger/wandb.yaml reads (offline unless logged in), and one wandb run per job.
"""

from __future__ import annotations

import netrc
import os
import re
import secrets
import string
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dblock.files import atomic_write


def wandb_offline() -> bool:
    """wandb runs offline unless the user is logged in (API key in the environment or netrc)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if os.environ.get("WANDB_API_KEY"):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is None
    except (OSError, netrc.NetrcParseError):
        return True


OmegaConf.register_new_resolver("dblock.wandb_offline", wandb_offline, replace=True)


def wandb_run_id(out_dir: Path, fresh_start: bool) -> str:
    """The wandb run id of this run dir (``<run dir>/wandb-run-id``), so that a resumed run
    continues the same wandb run; a new one when training starts from scratch."""
    path = out_dir / "wandb-run-id"
    if not fresh_start and path.is_file():
        run_id = path.read_text().strip()
        if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            return run_id
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    atomic_write(path, lambda f: f.write(f"{run_id}\n".encode()))
    return run_id


def finish_wandb() -> None:
    """Close the wandb run, if any: one wandb run per job, also inside a multirun."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
