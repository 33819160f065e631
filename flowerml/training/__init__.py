"""Training a run: the run's files, its record and checkpoints, seeding, the optimiser, the task a step computes, the epoch loop, the linear probe, and the metrics each validation measures."""
