"""Hooks into `Trainer.fit`: what tools (the study, benchmarks, users) build training on.

A `Callback` subclass overrides the hooks it needs; `Trainer.fit(callbacks=[...])` calls
them in the Keras order: `on_train_begin` once, `on_step_end` after every optimizer step,
`on_evaluate` after every evaluation (each `train.eval_every` steps and the final one),
`on_train_end` once with the summary.

Every rank runs every hook, at the same point of the same step, and the callbacks of a
list in the order given. So a hook may make collectives (`trainer.strategy.all_reduce`,
`allgather_object`, `trainer.evaluate(...)`), as long as it makes the same ones on every
rank; rank 0 owns side effects (files, prints). A hook that raises ends `fit` on that
rank: raise on every rank together (decide collectively first), or the others wait in
their next collective.

`Trainer.fit` is the only training loop: a tool needs no loop of its own and no private
state of the trainer or of a layer. The step's local numbers are in `logs`
(`Trainer.train_step`); layers with `has_moving_statistics` expose the moments of their
last training input as `batch_moments`.
"""

from __future__ import annotations

__all__ = ["Callback", "CallbackList"]


class Callback:
    """Base class of `Trainer.fit` hooks; every hook does nothing here.

    Every rank calls every hook in the same order (see the module docstring), so a hook
    may make collectives, the same on every rank.
    """

    def on_train_begin(self, trainer) -> None:
        """Called once by `fit`, after the weights are broadcast and before the first step.

        Args:
            trainer: the `Trainer` (its `step` is where training starts: > 0 on a resume).
        """

    def on_step_end(self, trainer, step, logs) -> None:
        """Called after every optimizer step (a skipped one too).

        Args:
            trainer: the `Trainer`.
            step: the steps taken so far (1 after the first), `trainer.step`.
            logs: the dict `train_step()` returned: "epoch", "learning_rate", "grad_norm",
                this rank's "loss_sum" (of the per-sample losses, without the
                regularization penalty), "correct" and "samples", and "skipped" for a
                step skipped for non-finite values. Local to the rank: sum them over
                ranks for the global batch's.
        """

    def on_evaluate(self, trainer, step, metrics) -> None:
        """Called after every evaluation of the test split `fit` makes.

        Args:
            trainer: the `Trainer`.
            step: `trainer.step` when it evaluated.
            metrics: the `evaluate()` record ({"split", "step", "epoch", "loss",
                "accuracy", "samples", "wall_time"}), the same on every rank.
        """

    def on_train_end(self, trainer, summary) -> None:
        """Called once when training is done: the replica-local moving statistics are
        averaged, the final evaluation made and model.npz written.

        Args:
            trainer: the `Trainer`.
            summary: the dict `fit` returns.
        """


class CallbackList(Callback):
    """Several callbacks called in order, as one.

    Args:
        callbacks: None or an iterable of `Callback`s (anything with the four hooks).

    Raises:
        TypeError: for an entry without the hooks, naming it.
    """

    _HOOKS = ("on_train_begin", "on_step_end", "on_evaluate", "on_train_end")

    def __init__(self, callbacks=None):
        if isinstance(callbacks, Callback):
            callbacks = [callbacks]
        self.callbacks = list(callbacks or ())
        for i, cb in enumerate(self.callbacks):
            missing = [h for h in self._HOOKS if not callable(getattr(cb, h, None))]
            if missing:
                raise TypeError(f"callbacks[{i}] must be a distbn.train.callbacks.Callback "
                                f"(it lacks {', '.join(missing)}), got {cb!r}")

    def on_train_begin(self, trainer) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(trainer)

    def on_step_end(self, trainer, step, logs) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, step, logs)

    def on_evaluate(self, trainer, step, metrics) -> None:
        for cb in self.callbacks:
            cb.on_evaluate(trainer, step, metrics)

    def on_train_end(self, trainer, summary) -> None:
        for cb in self.callbacks:
            cb.on_train_end(trainer, summary)
