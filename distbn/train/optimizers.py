"""Optimizers with Keras 3 update rules: SGD (momentum, Nesterov), Adam, AdamW.

`opt.apply(variables)` updates every trainable Variable that has a `.grad`, in this order
(Keras 3's `apply`): decoupled weight decay `w -= w * weight_decay * lr`, the update
rule, then `w = w.constraint(w)`; finally `iterations += 1`. The learning rate is the
schedule's value at `iterations` (before the increment).

Keras 3 applies `weight_decay` the same decoupled way for every optimizer (SGD and Adam
too); AdamW is Adam with a default weight decay of 0.004. This differs from PyTorch's
`Adam(weight_decay=...)`, which adds an L2 term to the gradient.

Gradient clipping is a separate step (`clip_by_global_norm`), run by the trainer after
the gradient all-reduce so every rank clips the same global gradient.
"""

from __future__ import annotations

import difflib
import math
import re

import numpy as np

from distbn import _objects
from distbn.checks import check_bool, check_number
from distbn.train import schedules

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "clip_by_global_norm", "clip_gradients",
           "check_clipnorm", "get", "get_class"]


def _in_unit_interval(value, name: str) -> float:
    """A float in [0, 1), or a ValueError quoting it."""
    return check_number(value, name, low=0, high=1, high_open=True)


def _non_negative(value, name: str) -> float:
    return check_number(value, name, low=0)


def check_clipnorm(value, name: str = "max_norm") -> float:
    """A gradient-norm bound: a positive finite float (`clip_by_global_norm`'s `max_norm`,
    the config's `train.optimizer.global_clipnorm`), or a ValueError quoting it."""
    return check_number(value, name, low=0, low_open=True)


class Optimizer:
    """Base class: learning-rate schedule, weight decay, slots, iterations and state.

    Args:
        learning_rate: a float, a schedule, or a schedule dict `{"type": ..., ...}`.
        weight_decay: None or a non-negative float (decoupled: `w -= w * wd * lr`).
        name: the optimizer's name.
    """

    #: per-variable state arrays this optimizer keeps, e.g. ("momentum", "velocity")
    slot_names: tuple[str, ...] = ()

    def __init__(self, learning_rate, weight_decay=None, name=None):
        if isinstance(learning_rate, (dict, schedules.LearningRateSchedule)):
            self.schedule = schedules.get(learning_rate)
        else:
            # Validates (non-negative finite) and quotes the argument's name.
            self.schedule = schedules.Constant(
                _non_negative(learning_rate, "learning_rate"))
        self.weight_decay = None if weight_decay is None else _non_negative(
            weight_decay, "weight_decay")
        self.name = name or type(self).__name__.lower()
        self.iterations = 0
        self._slots: dict[str, dict[str, np.ndarray]] = {}
        self._decay_excluded: list[str] = []

    # --- learning rate ---------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """The rate the next `apply` uses (the schedule at `iterations`)."""
        return float(self.schedule(self.iterations))

    # --- weight decay ----------------------------------------------------------------------
    def exclude_from_weight_decay(self, var_names=()) -> None:
        """Exempt variables whose path (`<layer>/<weight>`) matches any of these regexes.

        Args:
            var_names: iterable of patterns, e.g. ["bias", "batch_normalization"].
        """
        for pattern in var_names:
            re.compile(pattern)  # fail here, not at the first step
            self._decay_excluded.append(pattern)

    def _use_weight_decay(self, var) -> bool:
        return not any(re.search(p, var.path) for p in self._decay_excluded)

    # --- slots -----------------------------------------------------------------------------
    def _slot_shapes(self, var) -> dict[str, tuple]:
        return {s: var.shape for s in self.slot_names}

    def build(self, variables) -> None:
        """Create zero slots for every trainable variable that has none yet.

        Args:
            variables: Variables (non-trainable ones are skipped).
        """
        seen = set()
        for var in variables:
            if not var.trainable:
                continue
            if var.path in seen:
                raise ValueError(
                    f"{self.name}: two variables share the path {var.path!r}; slots are "
                    "keyed by path"
                )
            seen.add(var.path)
            slots = self._slots.get(var.path)
            if slots is None:
                self._slots[var.path] = {
                    s: np.zeros(shape, dtype=var.dtype)
                    for s, shape in self._slot_shapes(var).items()
                }
                continue
            for s, shape in self._slot_shapes(var).items():
                # Slots loaded by set_state before the variables were seen: check now.
                if slots[s].shape != shape:
                    raise ValueError(
                        f"{self.name}: slot {var.path}/{s} has shape {slots[s].shape}, "
                        f"variable {var.path!r} has shape {shape}"
                    )
                slots[s] = slots[s].astype(var.dtype, copy=False)

    # --- update ----------------------------------------------------------------------------
    def apply(self, variables) -> None:
        """Update each trainable Variable from its `.grad` (None grads are skipped).

        Args:
            variables: Variables, e.g. `model.trainable_weights`.
        """
        active = [v for v in variables if v.trainable and v.grad is not None]
        self.build(active)
        lr = self.learning_rate
        if self.weight_decay:
            for var in active:
                if self._use_weight_decay(var):
                    w = var.value
                    w -= w * var.dtype.type(self.weight_decay * lr)
        for var in active:
            grad = np.asarray(var.grad)
            if grad.shape != var.shape:
                raise ValueError(
                    f"{self.name}: gradient of {var.path!r} has shape {grad.shape}, "
                    f"the variable has shape {var.shape}"
                )
            self._update(var, grad.astype(var.dtype, copy=False), lr, self._slots[var.path])
        for var in active:
            if var.constraint is not None:
                var.assign(var.constraint(var.value))
        self.iterations += 1

    def _update(self, var, grad: np.ndarray, lr: float, slots: dict) -> None:
        raise NotImplementedError

    # --- state -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, np.ndarray]:
        """`{"iterations": int64 scalar, "<var path>/<slot>": array}` (copies, no objects)."""
        state = {"iterations": np.asarray(self.iterations, dtype=np.int64)}
        for path, slots in self._slots.items():
            for s, value in slots.items():
                state[f"{path}/{s}"] = value.copy()
        return state

    def set_state(self, state: dict) -> None:
        """Load `get_state()`'s output; everything is checked before anything is set.

        Once built (after `build` or an `apply`), the keys must be exactly this
        optimizer's and every shape must match; before that, slots are checked when
        their variables first appear.

        Raises:
            ValueError: naming the missing, unexpected or wrongly shaped entry.
        """
        if "iterations" not in state:
            raise ValueError(f"{self.name}: optimizer state lacks 'iterations'")
        it = np.asarray(state["iterations"])
        if it.shape != () or not np.issubdtype(it.dtype, np.integer) or int(it) < 0:
            raise ValueError(
                f"{self.name}: 'iterations' must be a non-negative integer scalar, got "
                f"{state['iterations']!r}"
            )
        loaded: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            if key == "iterations":
                continue
            path, _, slot = key.rpartition("/")
            if not path or slot not in self.slot_names:
                raise ValueError(
                    f"{self.name}: unexpected optimizer state entry {key!r} (slots are "
                    f"'<var path>/<slot>' with slot in {list(self.slot_names)})"
                )
            loaded.setdefault(path, {})[slot] = np.array(value, copy=True)
        for path, slots in loaded.items():
            missing = [s for s in self.slot_names if s not in slots]
            if missing:
                raise ValueError(f"{self.name}: optimizer state lacks {path}/{missing[0]!r}")
        if self._slots:
            for path, slots in self._slots.items():
                if path not in loaded and self.slot_names:
                    raise ValueError(
                        f"{self.name}: optimizer state lacks {path}/{self.slot_names[0]}"
                    )
                for s, current in slots.items():
                    if loaded[path][s].shape != current.shape:
                        raise ValueError(
                            f"{self.name}: state entry {path}/{s} has shape "
                            f"{loaded[path][s].shape}, expected {current.shape}"
                        )
            extra = [p for p in loaded if p not in self._slots]
            if extra:
                raise ValueError(
                    f"{self.name}: optimizer state has slots for unknown variable {extra[0]!r}"
                )
            for path, slots in self._slots.items():
                for s in slots:
                    slots[s] = loaded[path][s].astype(slots[s].dtype)
        else:
            self._slots = loaded
        self.iterations = int(it)

    # --- config ----------------------------------------------------------------------------
    def get_config(self) -> dict:
        """The constructor arguments (a schedule as `{"type": ..., **its config}`)."""
        schedule = self.schedule
        if isinstance(schedule, schedules.Constant) and schedule.warmup_steps == 0:
            learning_rate = schedule.initial
        else:
            learning_rate = {"type": schedule.type_name, **schedule.get_config()}
        return {"name": self.name, "learning_rate": learning_rate,
                "weight_decay": self.weight_decay}

    @classmethod
    def from_config(cls, config: dict):
        """Rebuild from `get_config()`'s output."""
        return cls(**config)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} iterations={self.iterations}>"


class SGD(Optimizer):
    """Keras 3 SGD: `m = momentum * m - lr * g`; `w += m`, or with Nesterov
    `w += momentum * m - lr * g`; plain `w -= lr * g` when momentum is 0.

    Args:
        learning_rate: float (default 0.01), schedule or schedule dict.
        momentum: float in [0, 1).
        nesterov: Nesterov momentum.
        weight_decay: None or non-negative float (decoupled, Keras 3).
        name: default "SGD".
    """

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, weight_decay=None,
                 name="SGD"):
        super().__init__(learning_rate, weight_decay=weight_decay, name=name)
        self.momentum = _in_unit_interval(momentum, "momentum")
        self.nesterov = check_bool(nesterov, "nesterov")
        self.slot_names = ("momentum",) if self.momentum else ()

    def _update(self, var, grad, lr, slots):
        w = var.value
        lr_t = var.dtype.type(lr)
        if not self.momentum:
            w -= lr_t * grad
            return
        mom = var.dtype.type(self.momentum)
        m = slots["momentum"]
        m *= mom
        m -= lr_t * grad
        if self.nesterov:
            w += mom * m - lr_t * grad
        else:
            w += m

    def get_config(self) -> dict:
        return {**super().get_config(), "momentum": self.momentum, "nesterov": self.nesterov}


class Adam(Optimizer):
    """Keras 3 Adam: `m += (g - m)(1 - b1)`, `v += (g² - v)(1 - b2)`,
    `w -= m * lr * sqrt(1 - b2^t) / (1 - b1^t) / (sqrt(v) + epsilon)` with t = step + 1
    (epsilon outside the bias correction, "epsilon hat" as Keras places it).

    Args:
        learning_rate: float (default 0.001), schedule or schedule dict.
        beta_1, beta_2: floats in [0, 1).
        epsilon: non-negative float (default 1e-7, Keras').
        amsgrad: keep the running maximum of v.
        weight_decay: None or non-negative float (decoupled, Keras 3).
        name: default "adam".
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, weight_decay=None, name="adam"):
        super().__init__(learning_rate, weight_decay=weight_decay, name=name)
        self.beta_1 = _in_unit_interval(beta_1, "beta_1")
        self.beta_2 = _in_unit_interval(beta_2, "beta_2")
        self.epsilon = _non_negative(epsilon, "epsilon")
        self.amsgrad = check_bool(amsgrad, "amsgrad")
        self.slot_names = ("momentum", "velocity") + (("velocity_hat",) if amsgrad else ())

    def _update(self, var, grad, lr, slots):
        t = self.iterations + 1
        # Bias-corrected step size in float64, then cast once to the variable's dtype.
        alpha = lr * math.sqrt(1.0 - self.beta_2 ** t) / (1.0 - self.beta_1 ** t)
        dt = var.dtype.type
        m, v = slots["momentum"], slots["velocity"]
        m += (grad - m) * dt(1.0 - self.beta_1)
        v += (grad * grad - v) * dt(1.0 - self.beta_2)
        if self.amsgrad:
            v_hat = slots["velocity_hat"]
            np.maximum(v_hat, v, out=v_hat)
            v = v_hat
        w = var.value
        w -= m * dt(alpha) / (np.sqrt(v) + dt(self.epsilon))

    def get_config(self) -> dict:
        return {**super().get_config(), "beta_1": self.beta_1, "beta_2": self.beta_2,
                "epsilon": self.epsilon, "amsgrad": self.amsgrad}


class AdamW(Adam):
    """Adam with decoupled weight decay (Keras 3 / PyTorch AdamW: `w -= w * wd * lr`
    before the Adam step).

    Args:
        learning_rate: float (default 0.001), schedule or schedule dict.
        weight_decay: non-negative float (default 0.004, Keras').
        beta_1, beta_2, epsilon, amsgrad: as Adam.
        name: default "adamw".
    """

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, name="adamw"):
        if weight_decay is None:
            raise ValueError("AdamW needs a float weight_decay, got weight_decay=None")
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=amsgrad, weight_decay=weight_decay, name=name)


def clip_by_global_norm(grads, max_norm):
    """Scale gradients so their joint L2 norm is at most `max_norm` (Keras global_clipnorm).

    Args:
        grads: list of arrays (None entries are kept as None and ignored).
        max_norm: positive float.

    Returns:
        (list of gradients, each `g * max_norm / max(norm, max_norm)`; the global norm
        before clipping, as a float). With a non-finite norm the gradients come back
        unchanged, so the caller's NaN check sees them.
    """
    max_norm = check_clipnorm(max_norm)
    total = 0.0
    for g in grads:
        if g is not None:
            total += float(np.sum(np.square(np.asarray(g), dtype=np.float64)))
    norm = math.sqrt(total)
    if not math.isfinite(norm) or norm <= max_norm:
        return list(grads), norm
    scale = max_norm / norm
    return [None if g is None else (np.asarray(g) * scale).astype(np.asarray(g).dtype)
            for g in grads], norm


def clip_gradients(variables, max_norm) -> float:
    """`clip_by_global_norm` on the `.grad` of each Variable, in place.

    Returns:
        The global norm before clipping.
    """
    variables = list(variables)
    clipped, norm = clip_by_global_norm([v.grad for v in variables], max_norm)
    for var, g in zip(variables, clipped, strict=True):
        var.grad = g
    return norm


_TABLE = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def get_class(name) -> type:
    """The optimizer class a name selects ("sgd", "adam", "adamw"; any case).

    Raises:
        ValueError: quoting an unknown name, with the close ones.
    """
    key = name.lower() if isinstance(name, str) else None
    if key not in _TABLE:
        close = difflib.get_close_matches(str(name).lower(), list(_TABLE), n=2)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown optimizer {name!r} (known: {', '.join(_TABLE)}){hint}")
    return _TABLE[key]


def get(identifier, **kwargs) -> Optimizer:
    """Build an optimizer.

    Args:
        identifier: a name ("sgd", "adam", "adamw"; any case) with its arguments in
            `kwargs`, a dict `{"type": name, **arguments}`, or an Optimizer (returned).
        **kwargs: constructor arguments, e.g. learning_rate=0.1, momentum=0.9; a
            `learning_rate` may be a schedule dict `{"type": "cosine", ...}`.

    Returns:
        The optimizer.

    Raises:
        ValueError: quoting an unknown name or a bad argument value.
    """
    return _objects.build(identifier, kwargs, Optimizer, get_class, "an optimizer")
