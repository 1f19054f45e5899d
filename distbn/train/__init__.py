"""Training: config schema, data and sharded loader, losses, optimizers, schedules, trainer.

Submodules are imported explicitly (`from distbn.train import losses`); this package
file stays free of imports so each piece loads on its own.
"""

__all__: list[str] = []
