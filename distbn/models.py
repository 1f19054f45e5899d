"""`Sequential`: a stack of layers with forward, backward and named weights."""

from __future__ import annotations

import numpy as np

from distbn.layers import registry
from distbn.layers.base import Layer, Variable, _unique_name

__all__ = ["Sequential"]


class Sequential:
    """A linear stack of layers (Keras `Sequential` vocabulary, numpy forward/backward).

    Weights are named `<layer name>/<weight name>`; layer names must be unique.

    Args:
        layers: iterable of Layer instances (or `{"type": ..., ...}` layer configs).
        name: the model's name; default a unique "sequential[_N]".
    """

    def __init__(self, layers=None, name=None):
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name if name is not None else _unique_name("sequential")
        self._layers: list[Layer] = []
        self.built = False
        self.input_shape = None
        for layer in layers or []:
            self.add(layer)

    # --- structure -------------------------------------------------------------------------
    def add(self, layer) -> None:
        """Append a layer (or a layer config dict); its name must be new in the model."""
        if isinstance(layer, dict):
            layer = registry.deserialize(layer)
        if not isinstance(layer, Layer):
            raise TypeError(f"Sequential {self.name!r}: expected a Layer, got {layer!r}")
        if any(existing.name == layer.name for existing in self._layers):
            raise ValueError(
                f"Sequential {self.name!r}: duplicate layer name {layer.name!r}; "
                "layer names must be unique inside a model"
            )
        self._layers.append(layer)
        if self.built:
            self.build(self.input_shape)

    @property
    def layers(self) -> list[Layer]:
        return list(self._layers)

    def get_layer(self, name: str) -> Layer:
        """The layer called `name`."""
        for layer in self._layers:
            if layer.name == name:
                return layer
        raise ValueError(
            f"Sequential {self.name!r} has no layer {name!r} "
            f"(layers: {', '.join(la.name for la in self._layers)})"
        )

    def build(self, input_shape) -> None:
        """Build every unbuilt layer in order from the input shape (batch axis first,
        may be None)."""
        shape = tuple(input_shape)
        self.input_shape = shape
        for layer in self._layers:
            if not layer.built:
                layer.build(shape)
                layer.built = True
            shape = tuple(layer.compute_output_shape(shape))
        self.built = True

    def compute_output_shape(self, input_shape) -> tuple:
        """Output shape of the stack for `input_shape`."""
        shape = tuple(input_shape)
        for layer in self._layers:
            shape = tuple(layer.compute_output_shape(shape))
        return shape

    # --- passes ----------------------------------------------------------------------------
    def __call__(self, x, training=False, sample_ids=None, step=None):
        """Forward pass through every layer.

        Args:
            x: input batch (the local rows under data parallelism).
            training: True for the training pass (dropout on, batch statistics).
            sample_ids: global indices of the rows of `x` (int array, one per row); default
                arange(batch). Keys Dropout masks, so N ranks reproduce one rank.
            step: global training step keying Dropout masks; None lets each Dropout
                count its own training calls.

        Returns:
            The output array.
        """
        x = np.asarray(x)
        if not self.built:
            self.build((None,) + x.shape[1:])
        if sample_ids is not None and np.shape(sample_ids) != (x.shape[0],):
            raise ValueError(
                f"sample_ids must have one id per row of x (shape ({x.shape[0]},)), got "
                f"shape {np.shape(sample_ids)}"
            )
        for layer in self._layers:
            if getattr(layer, "uses_sample_ids", False):
                x = layer(x, training=training, sample_ids=sample_ids, step=step)
            else:
                x = layer(x, training=training)
        return x

    def backward(self, dy, regularization_scale=1.0):
        """Backward pass of the last call: sets every trainable weight's `.grad`.

        Args:
            dy: gradient of the loss w.r.t. the model output.
            regularization_scale: factor on the regularizer gradients the layers add
                (1 = as the layers do). Under data parallelism the gradients are summed
                over ranks, so pass 1/num_replicas (or 1 on one rank, 0 on the others)
                to count the penalty once.

        Returns:
            The gradient w.r.t. the model input.
        """
        for layer in reversed(self._layers):
            dy = layer.backward(dy)
        if regularization_scale != 1.0:
            for w in self.trainable_weights:
                if w.regularizer is not None and w.grad is not None:
                    reg = w.regularizer.gradient(w.value)
                    w.grad = (w.grad + (regularization_scale - 1.0) * reg).astype(w.dtype)
        return dy

    # --- weights ---------------------------------------------------------------------------
    @property
    def weights(self) -> list[Variable]:
        return [w for layer in self._layers for w in layer.weights]

    @property
    def trainable_weights(self) -> list[Variable]:
        return [w for layer in self._layers for w in layer.trainable_weights]

    @property
    def non_trainable_weights(self) -> list[Variable]:
        return [w for layer in self._layers for w in layer.non_trainable_weights]

    def named_weights(self) -> dict[str, Variable]:
        """`{"<layer name>/<weight name>": Variable}` in layer order."""
        named = {}
        for layer in self._layers:
            for w in layer.weights:
                key = f"{layer.name}/{w.name}"
                if key in named:
                    raise ValueError(f"Sequential {self.name!r}: two weights named {key!r}")
                named[key] = w
        return named

    def get_weight_dict(self) -> dict[str, np.ndarray]:
        """Copies of every weight, keyed `<layer name>/<weight name>`."""
        return {key: w.numpy() for key, w in self.named_weights().items()}

    def set_weight_dict(self, values: dict) -> None:
        """Load every weight from `values`; all names and shapes are checked before
        anything is assigned, so an error loads nothing.

        Raises:
            ValueError: naming the missing, unexpected or wrongly shaped tensor.
        """
        named = self.named_weights()
        missing = [k for k in named if k not in values]
        if missing:
            raise ValueError(
                f"Sequential {self.name!r}: weight dict lacks {missing[0]!r}"
                + (f" (and {len(missing) - 1} more: {missing[1:]})" if len(missing) > 1 else "")
            )
        extra = [k for k in values if k not in named]
        if extra:
            raise ValueError(
                f"Sequential {self.name!r}: weight dict has unexpected tensor {extra[0]!r} "
                f"(model weights: {', '.join(named)})"
            )
        for key, w in named.items():
            if np.shape(values[key]) != w.shape:
                raise ValueError(
                    f"Sequential {self.name!r}: tensor {key!r} has shape "
                    f"{np.shape(values[key])}, the model expects {w.shape}"
                )
        for key, w in named.items():
            w.assign(values[key])

    @property
    def losses(self) -> list[float]:
        """Every layer's regularization penalty at the current weights (Keras: a list)."""
        return [p for layer in self._layers for p in layer.regularization_losses()]

    @property
    def regularization_loss(self) -> float:
        """The sum of `losses` (0.0 without regularizers)."""
        return float(sum(self.losses))

    def count_params(self) -> int:
        """Total number of weight elements."""
        return int(sum(w.value.size for w in self.weights))

    # --- description -----------------------------------------------------------------------
    def summary(self) -> str:
        """A table of layer name, type, output shape and parameter count, with totals."""
        if not self.built:
            raise ValueError(
                f"Sequential {self.name!r} is not built: call build(input_shape) or the "
                "model on a batch first"
            )
        rows = [("Layer (name)", "Type", "Output shape", "Params")]
        shape = self.input_shape
        for layer in self._layers:
            shape = tuple(layer.compute_output_shape(shape))
            params = sum(w.value.size for w in layer.weights)
            rows.append((layer.name, type(layer).__name__, str(shape), f"{params:,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]

        def fmt(r):
            return "  ".join([r[0].ljust(widths[0]), r[1].ljust(widths[1]),
                              r[2].ljust(widths[2]), r[3].rjust(widths[3])])

        rule = "-" * len(fmt(rows[0]))
        trainable = sum(w.value.size for w in self.trainable_weights)
        non_trainable = sum(w.value.size for w in self.non_trainable_weights)
        lines = [f'Model: "{self.name}"', rule, fmt(rows[0]), rule]
        lines += [fmt(r) for r in rows[1:]]
        lines += [rule, f"Total params: {trainable + non_trainable:,}",
                  f"Trainable params: {trainable:,}",
                  f"Non-trainable params: {non_trainable:,}"]
        return "\n".join(lines)

    # --- config ----------------------------------------------------------------------------
    def get_config(self) -> dict:
        """`{"name": ..., "layers": [{"type": ..., **layer config}, ...]}`."""
        return {"name": self.name, "layers": [registry.serialize(la) for la in self._layers]}

    @classmethod
    def from_config(cls, config: dict) -> Sequential:
        """Rebuild (unbuilt) from `get_config()`'s output."""
        return cls([registry.deserialize(c) for c in config.get("layers", [])],
                   name=config.get("name"))

    def __repr__(self) -> str:
        return f"<Sequential name={self.name!r} layers={len(self._layers)} built={self.built}>"
