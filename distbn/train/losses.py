"""Losses with their gradients, and the accuracy metric.

Each loss returns per-sample losses and the gradient of their SUM w.r.t. the
predictions. The trainer divides both by the GLOBAL number of samples in the step, so
a rank's share is exact whatever slice of the global batch it holds: summing the
ranks' gradients gives the one-process gradient of the mean loss.
"""

from __future__ import annotations

import difflib

import numpy as np

__all__ = ["sparse_categorical_crossentropy", "mean_squared_error", "accuracy", "get"]


def _check_labels(labels, logits_shape) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != logits_shape[:-1]:
        raise ValueError(
            f"labels must have shape {logits_shape[:-1]} (logits shape {logits_shape} "
            f"without the class axis), got shape {labels.shape}"
        )
    if labels.size == 0:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or np.any(labels != np.round(labels)):
            raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    classes = logits_shape[-1]
    bad = (labels < 0) | (labels >= classes)
    if np.any(bad):
        value = labels[bad].flat[0].item()
        raise ValueError(
            f"labels must be in [0, {classes}) for {classes} classes, got label {value!r} "
            f"({int(bad.sum())} out of range)"
        )
    return labels.astype(np.int64, copy=False)


# Probabilities are clipped to [EPSILON, 1 - EPSILON] before the log, as Keras does.
EPSILON = 1e-7


def sparse_categorical_crossentropy(y_pred, labels, from_logits=False):
    """Cross-entropy of integer labels, as Keras' `sparse_categorical_crossentropy`.

    Args:
        y_pred: (..., classes) float predictions: probabilities (from_logits=False, Keras'
            default: e.g. the output of a softmax; normalised to sum 1 and clipped to
            [1e-7, 1 - 1e-7], as Keras does) or unnormalised scores (from_logits=True:
            a stable log-softmax is applied here).
        labels: (...) integer class ids in [0, classes) (integer-valued floats are fine).
        from_logits: whether `y_pred` are logits.

    Returns:
        (per-sample losses, float64 of shape labels.shape;
         d(sum of losses)/d(y_pred), y_pred's shape and float dtype).

    Raises:
        ValueError: on a shape mismatch or a label out of range (quoting it).
    """
    y_pred = np.asarray(y_pred)
    if y_pred.ndim < 1 or y_pred.shape[-1] < 1:
        raise ValueError(f"predictions need a non-empty class axis, got shape {y_pred.shape}")
    labels = _check_labels(labels, y_pred.shape)
    out_dtype = y_pred.dtype if np.issubdtype(y_pred.dtype, np.floating) else np.float64
    # float64 here: the loss is a reduction over classes; the gradient goes back in the
    # predictions' own dtype.
    z = y_pred.astype(np.float64)
    at = labels[..., None]
    if from_logits:
        z = z - z.max(axis=-1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
        picked = np.take_along_axis(log_p, at, axis=-1)[..., 0]
        grad = np.exp(log_p)
        np.put_along_axis(grad, at, np.take_along_axis(grad, at, axis=-1) - 1.0, axis=-1)
        return -picked, grad.astype(out_dtype, copy=False)
    total = z.sum(axis=-1, keepdims=True)
    p = np.take_along_axis(z, at, axis=-1) / total
    clipped = np.clip(p, EPSILON, 1.0 - EPSILON)
    # loss = -log(p_y / sum p): d/dp_j = 1/sum - [j = y]/p_y, zero where the clip holds.
    inside = (p > EPSILON) & (p < 1.0 - EPSILON)
    grad = np.where(inside, 1.0 / total, 0.0) * np.ones_like(z)
    at_label = np.divide(1.0, p * total, out=np.zeros_like(p), where=inside)
    np.put_along_axis(grad, at, np.take_along_axis(grad, at, axis=-1) - at_label, axis=-1)
    return -np.log(clipped[..., 0]), grad.astype(out_dtype, copy=False)


def mean_squared_error(predictions, targets):
    """Per-sample mean of squared errors over all non-batch axes (Keras' MSE for 2-D).

    Args:
        predictions: (batch, ...) floats.
        targets: the same shape.

    Returns:
        (per-sample losses, float64 of shape (batch,);
         d(sum of losses)/d(predictions), predictions' shape and float dtype).
    """
    predictions = np.asarray(predictions)
    targets = np.asarray(targets)
    if predictions.shape != targets.shape or predictions.ndim < 1:
        raise ValueError(
            f"predictions and targets must have the same shape (batch first), got "
            f"{predictions.shape} and {targets.shape}"
        )
    diff = predictions.astype(np.float64) - targets.astype(np.float64)
    per_sample_size = max(int(np.prod(predictions.shape[1:])), 1)
    losses = np.square(diff).reshape(len(diff), per_sample_size).sum(axis=1) / per_sample_size
    out_dtype = (predictions.dtype if np.issubdtype(predictions.dtype, np.floating)
                 else np.float64)
    return losses, (2.0 / per_sample_size * diff).astype(out_dtype, copy=False)


def accuracy(logits, labels) -> int:
    """How many rows' argmax equals the label (a count, so ranks can sum it).

    Args:
        logits: (..., classes) scores or probabilities.
        labels: (...) integer class ids.

    Returns:
        The number of correct predictions.
    """
    logits = np.asarray(logits)
    labels = _check_labels(labels, logits.shape)
    return int(np.count_nonzero(np.argmax(logits, axis=-1) == labels))


_LOSSES = {
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "mean_squared_error": mean_squared_error,
    "mse": mean_squared_error,
}


def get(name: str):
    """The loss function called `name` ("sparse_categorical_crossentropy", "mse", ...).

    Raises:
        ValueError: quoting an unknown name, with the closest known names.
    """
    if isinstance(name, str) and name in _LOSSES:
        return _LOSSES[name]
    close = difflib.get_close_matches(str(name), list(_LOSSES), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown loss {name!r} (known: {', '.join(sorted(_LOSSES))}){hint}")
