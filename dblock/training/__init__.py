"""Everything that knows Lightning: the task, the paper recipe, checkpoint IO and checks,
signals, progress and results.json."""
