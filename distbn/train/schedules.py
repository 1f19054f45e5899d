"""Learning-rate schedules: constant, step decay and cosine decay, each with an optional
linear warm-up.

A schedule maps the optimizer's step (its `iterations` before the update: 0 for the
first update) to a learning rate. With `warmup_steps = W > 0`, steps 0..W-1 ramp
linearly from `warmup_from` towards the schedule's initial rate (Keras' CosineDecay
warm-up arithmetic: step s gives `warmup_from + (lr0 - warmup_from) * s / W`), and the
decay then runs on `step - W`, so `decay_steps` does not include the warm-up.
"""

from __future__ import annotations

import difflib
import math

from distbn import _objects
from distbn.checks import check_int, check_number, is_number

__all__ = ["LearningRateSchedule", "Constant", "StepDecay", "CosineDecay", "get",
           "get_class"]


def _rate(value, name: str) -> float:
    return check_number(value, name, low=0)


class LearningRateSchedule(_objects.Configurable):
    """Base class: `schedule(step) -> float`, with linear warm-up handled here.

    Subclasses set `self.initial` (the rate warm-up reaches) and implement `_decay(step)`
    for steps counted from the end of warm-up.
    """

    #: the name `get` knows the schedule by
    type_name = ""

    def __init__(self, warmup_steps=0, warmup_from=0.0):
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0)
        self.warmup_from = _rate(warmup_from, "warmup_from")

    def _decay(self, step: int) -> float:
        raise NotImplementedError

    def __call__(self, step) -> float:
        """The learning rate for optimizer step `step` (>= 0)."""
        step = check_int(step, "step", minimum=0)
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_from + (self.initial - self.warmup_from) * frac
        return float(self._decay(step - self.warmup_steps))

    def get_config(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "warmup_from": self.warmup_from}


class Constant(LearningRateSchedule):
    """A fixed rate (after the optional warm-up).

    Args:
        learning_rate: non-negative float.
        warmup_steps: linear warm-up length in steps (0: none).
        warmup_from: the rate at step 0 of the warm-up.
    """

    type_name = "constant"

    def __init__(self, learning_rate, warmup_steps=0, warmup_from=0.0):
        super().__init__(warmup_steps, warmup_from)
        self.initial = _rate(learning_rate, "learning_rate")

    def _decay(self, step: int) -> float:
        return self.initial

    def get_config(self) -> dict:
        return {"learning_rate": self.initial, **super().get_config()}


class _Decay(LearningRateSchedule):
    """Shared arguments of the decays: the initial rate and the decay's length in steps."""

    def __init__(self, initial_learning_rate, decay_steps, warmup_steps, warmup_from):
        super().__init__(warmup_steps, warmup_from)
        self.initial = _rate(initial_learning_rate, "initial_learning_rate")
        self.decay_steps = check_int(decay_steps, "decay_steps", minimum=1)

    def get_config(self) -> dict:
        return {"initial_learning_rate": self.initial, "decay_steps": self.decay_steps,
                **super().get_config()}


class StepDecay(_Decay):
    """`initial_learning_rate * decay_rate ** floor(step / decay_steps)` (staircase).

    Args:
        initial_learning_rate: non-negative float.
        decay_steps: positive int, steps between drops.
        decay_rate: factor per drop, in (0, 1].
        warmup_steps: linear warm-up length in steps (0: none).
        warmup_from: the rate at step 0 of the warm-up.
    """

    type_name = "step"

    def __init__(self, initial_learning_rate, decay_steps, decay_rate=0.1, warmup_steps=0,
                 warmup_from=0.0):
        super().__init__(initial_learning_rate, decay_steps, warmup_steps, warmup_from)
        self.decay_rate = check_number(decay_rate, "decay_rate", low=0, high=1, low_open=True)

    def _decay(self, step: int) -> float:
        return self.initial * self.decay_rate ** (step // self.decay_steps)

    def get_config(self) -> dict:
        return {**super().get_config(), "decay_rate": self.decay_rate}


class CosineDecay(_Decay):
    """Keras CosineDecay: `lr0 * ((1 - alpha) * 0.5 * (1 + cos(pi * s / decay_steps)) + alpha)`
    with s clipped to decay_steps (so the rate stays at `alpha * lr0` afterwards).

    Args:
        initial_learning_rate: non-negative float.
        decay_steps: positive int, length of the decay (after warm-up).
        alpha: final rate as a fraction of the initial one, in [0, 1].
        warmup_steps: linear warm-up length in steps (0: none).
        warmup_from: the rate at step 0 of the warm-up.
    """

    type_name = "cosine"

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, warmup_steps=0,
                 warmup_from=0.0):
        super().__init__(initial_learning_rate, decay_steps, warmup_steps, warmup_from)
        self.alpha = check_number(alpha, "alpha", low=0, high=1)

    def _decay(self, step: int) -> float:
        frac = min(step, self.decay_steps) / self.decay_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.initial * ((1.0 - self.alpha) * cosine + self.alpha)

    def get_config(self) -> dict:
        return {**super().get_config(), "alpha": self.alpha}


_TABLE = {
    "constant": Constant, "Constant": Constant,
    "step": StepDecay, "step_decay": StepDecay, "StepDecay": StepDecay,
    "cosine": CosineDecay, "cosine_decay": CosineDecay, "CosineDecay": CosineDecay,
}


def get_class(name) -> type:
    """The schedule class a name selects ("constant", "step", "cosine", or the class name).

    Raises:
        ValueError: quoting an unknown name, with the close ones.
    """
    if isinstance(name, str) and name in _TABLE:
        return _TABLE[name]
    close = difflib.get_close_matches(str(name), list(_TABLE), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown learning-rate schedule {name!r} (known: constant, step, cosine){hint}"
    )


def get(identifier, **kwargs) -> LearningRateSchedule:
    """Build a schedule.

    Args:
        identifier: a number (constant rate), a name ("constant", "step", "cosine") with
            its arguments in `kwargs`, a dict `{"type": name, **arguments}`, or a schedule
            (returned as is).
        **kwargs: the schedule's arguments when `identifier` is a name.

    Returns:
        The schedule.

    Raises:
        ValueError: quoting an unknown name or a bad argument value.
    """
    if is_number(identifier):
        return Constant(identifier, **kwargs)
    return _objects.build(identifier, kwargs, LearningRateSchedule, get_class, "a schedule")
