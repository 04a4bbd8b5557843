"""Hyperparameter search with current Optuna, as a Hydra sweeper (`+sweep=optuna`).

- `sweeper`: asks trials from a study, launches them as Hydra jobs, tells their objectives back.
- `space`: Hydra's sweep syntax (`choice`, `range`, `tag(log, interval(...))`) as Optuna distributions.
- `storage`: the study's database or journal file, opened alike by the sweeper and the trials, and the lock under
  which a worker starts a trial.
- `seeding`: the sampler built for each trial with a seed of its own, derived from the configured seed.
- `pruning`: the Lightning callback through which a trial reports each epoch and stops when pruned.
- `config`: the sweeper's structured configs (samplers, pruners).
"""
