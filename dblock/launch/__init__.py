"""Everything that knows Hydra and OmegaConf: config keys and values, the checks before a run,
sweeps, SLURM, the run lock, exits, console setup and the wandb offline choice."""

from dblock.launch import wandb_setup  # noqa: F401, E402  (registers the dblock.* resolvers)
