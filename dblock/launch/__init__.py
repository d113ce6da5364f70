"""Everything that knows Hydra and OmegaConf: config keys and values, the checks before a run,
sweeps, SLURM, the run lock, exits, console setup and the wandb offline choice."""
