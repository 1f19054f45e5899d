"""Models: `Sequential` (a stack of layers) and `Model` (layers that name their inputs:
residual blocks, branches and merges), with forward, backward and named weights."""

from __future__ import annotations

import numpy as np

from distbn.layers import registry
from distbn.layers.base import Layer, Variable
from distbn.layers.base import unique_name as _unique_name

__all__ = ["INPUT", "Model", "Sequential"]

#: The name that stands for the model's input in a layer's `inputs`.
INPUT = "input"


def _common_mask(masks):
    """The mask a layer gets from its sources: theirs when they agree, else None."""
    first = masks[0]
    if first is None or any(m is None or m.shape != first.shape or not np.array_equal(m, first)
                            for m in masks[1:]):
        return None
    return first


class Sequential:
    """A linear stack of layers (Keras `Sequential` vocabulary, numpy forward/backward).

    Weights are named `<layer name>/<weight name>`; layer names must be unique. `Model`
    is the same with layers that name their inputs.

    A BatchNormalization whose output only a ReLU takes runs that ReLU inside its own
    pass (`BatchNormalization.fuse_relu`: one pass over the data instead of two, the
    same results); the ReLU layer then passes its input through. Set
    `fuse_activations = False` (before the first call, or call `apply_fusion()` after) to
    run every layer separately.

    Args:
        layers: iterable of Layer instances (or `{"type": ..., ...}` layer configs).
        name: the model's name; default a unique "sequential[_N]".
    """

    #: Whether building the model fuses BatchNormalization + ReLU pairs (see above).
    fuse_activations = True

    def __init__(self, layers=None, name=None):
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        self.name = name if name is not None else _unique_name(self._default_name())
        self._layers: list[Layer] = []
        self.built = False
        self.input_shape = None
        self._fused: set[str] = set()  # names of the ReLU layers a BN runs
        for layer in layers or []:
            self.add(layer)

    @classmethod
    def _default_name(cls) -> str:
        return "sequential"

    # --- wiring: which outputs each layer takes (Model overrides) -----------------------------
    def sources(self, index: int) -> list[str]:
        """The names whose outputs layer `index` takes: the previous layer's (INPUT first)."""
        return [INPUT if index == 0 else self._layers[index - 1].name]

    @property
    def order(self) -> list[int]:
        """Layer indices in an order where every layer comes after its sources."""
        return list(range(len(self._layers)))

    def _inputs_of(self, index, values):
        """Layer `index`'s input from `values` (name -> array or shape): one, or a list
        for a layer that takes several."""
        got = [values[name] for name in self.sources(index)]
        return got if getattr(self._layers[index], "multi_input", False) else got[0]

    def layer_outputs(self, x, training=False, sample_ids=None, step=None, mask=None):
        """Run the forward pass, yielding `(layer, output)` for each layer in `order`.

        The same pass as `__call__` (which returns the last layer's output); the trainer
        replays it to find the first layer with a non-finite output.

        `mask` (batch, steps), for (batch, steps, features) inputs, is passed to every
        layer whose input it fits, as Keras propagates a mask: it follows an output that
        keeps the batch and step axes (Dense, BatchNormalization, ...), and ends where a
        layer changes them (GlobalAveragePooling1D consumes it, Flatten drops it).
        """
        if not self.built:
            self.build((None,) + np.shape(x)[1:])
        values, masks = {INPUT: x}, {INPUT: None if mask is None else np.asarray(mask)}
        for i in self.order:
            layer = self._layers[i]
            h = self._inputs_of(i, values)
            m = _common_mask([masks[name] for name in self.sources(i)])
            if layer.name in self._fused:  # its BatchNormalization applied it already
                out = h
            elif getattr(layer, "uses_sample_ids", False):
                out = layer(h, training=training, mask=m, sample_ids=sample_ids, step=step)
            else:
                out = layer(h, training=training, mask=m)
            values[layer.name] = out
            fits = m is not None and np.ndim(out) >= 3 and np.shape(out)[:2] == m.shape
            masks[layer.name] = m if fits else None
            yield layer, out

    # --- structure -------------------------------------------------------------------------
    def add(self, layer) -> None:
        """Append a layer (or a layer config dict); its name must be new in the model."""
        if isinstance(layer, dict):
            layer = registry.deserialize(layer)
        if not isinstance(layer, Layer):
            raise TypeError(f"{type(self).__name__} {self.name!r}: expected a Layer, got {layer!r}")
        if any(existing.name == layer.name for existing in self._layers):
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: duplicate layer name {layer.name!r}; "
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
            f"{type(self).__name__} {self.name!r} has no layer {name!r} "
            f"(layers: {', '.join(la.name for la in self._layers)})"
        )

    def build(self, input_shape) -> None:
        """Build every unbuilt layer in order from the input shape (batch axis first,
        may be None)."""
        self.input_shape = tuple(input_shape)
        for _ in self.build_layers(input_shape):
            pass
        self.built = True
        self.apply_fusion()

    def apply_fusion(self) -> list[tuple[str, str]]:
        """(Re)decide which BatchNormalization + ReLU pairs run fused.

        A pair fuses when the ReLU takes the BN's output and no other layer (nor the
        model's output) does, `fuse_activations` is on and the BN accepts it (same
        dtype policy, not float16). Called by `build`; call it again after changing
        `fuse_activations`.

        Returns:
            The fused (BatchNormalization name, ReLU name) pairs.
        """
        from distbn.layers.core import ReLU
        from distbn.layers.normalization import BatchNormalization

        for layer in self._layers:
            if isinstance(layer, BatchNormalization):
                layer.fuse_relu(None)
        self._fused = set()
        if not self.fuse_activations or not self._layers:
            return []
        readers: dict[str, list[int]] = {}
        for i in range(len(self._layers)):
            for src in self.sources(i):
                readers.setdefault(src, []).append(i)
        pairs = []
        by_name = {la.name: la for la in self._layers}
        for j, relu in enumerate(self._layers):
            srcs = self.sources(j)
            if type(relu) is not ReLU or len(srcs) != 1 or srcs[0] not in by_name:
                continue
            bn = by_name[srcs[0]]
            if (type(bn) is BatchNormalization and readers.get(bn.name) == [j]
                    and bn is not self._layers[-1] and bn.fuse_relu(relu)):
                self._fused.add(relu.name)
                pairs.append((bn.name, relu.name))
        return pairs

    def build_layers(self, input_shape):
        """Build every unbuilt layer in `order`, yielding `(layer, its output shape)`;
        a layer that cannot take its input shape raises there (the builder blames its
        config entry)."""
        shapes = {INPUT: tuple(input_shape)}
        for i in self.order:
            layer = self._layers[i]
            shape = self._inputs_of(i, shapes)
            if not layer.built:
                layer.build(shape)
                layer.built = True
            shapes[layer.name] = tuple(layer.compute_output_shape(shape))
            yield layer, shapes[layer.name]

    def compute_output_shape(self, input_shape) -> tuple:
        """Output shape of the model (its last layer) for `input_shape`."""
        shapes = {INPUT: tuple(input_shape)}
        for i in self.order:
            layer = self._layers[i]
            shapes[layer.name] = tuple(layer.compute_output_shape(self._inputs_of(i, shapes)))
        return shapes[self._layers[-1].name] if self._layers else tuple(input_shape)

    # --- passes ----------------------------------------------------------------------------
    def __call__(self, x, training=False, sample_ids=None, step=None, mask=None):
        """Forward pass through every layer.

        Args:
            x: input batch (the local rows under data parallelism).
            training: True for the training pass (dropout on, batch statistics).
            sample_ids: global indices of the rows of `x` (int array, one per row); default
                arange(batch). Keys Dropout masks, so N ranks reproduce one rank.
            step: global training step keying Dropout masks; None lets each Dropout
                count its own training calls.
            mask: optional (batch, steps) mask of (batch, steps, features) inputs
                (Keras' convention; see `layer_outputs`).

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
        out = x
        for _, output in self.layer_outputs(x, training, sample_ids, step, mask):
            out = output
        return out

    def predict(self, x, batch_size=256):
        """Outputs in inference mode (moving statistics, no dropout), `batch_size` rows at
        a time.

        Args:
            x: inputs in the model's layout, batch axis first.
            batch_size: rows per forward pass (>= 1).

        Returns:
            The outputs for every row of `x`, in order.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        x = np.asarray(x)
        if len(x) == 0:
            shape = self.compute_output_shape((0,) + x.shape[1:])
            return np.zeros(shape, dtype=self._layers[-1].compute_dtype)
        return np.concatenate([self(x[i:i + batch_size], training=False)
                               for i in range(0, len(x), batch_size)])

    def backward(self, dy, regularization_scale=1.0, input_grad=True):
        """Backward pass of the last call: sets every trainable weight's `.grad`.

        Args:
            dy: gradient of the loss w.r.t. the model output.
            regularization_scale: factor on the regularizer gradients the layers add
                (1 = as the layers do). Under data parallelism the gradients are summed
                over ranks, so pass 1/num_replicas (or 1 on one rank, 0 on the others)
                to count the penalty once.
            input_grad: False: the gradient w.r.t. the model input is not needed (the
                input is data), so layers that read only the input and can skip it
                (`input_grad_optional`: Conv2D, Dense) compute their weights' gradients
                alone.

        Returns:
            The gradient w.r.t. the model input (None with `input_grad=False`).
        """
        grads = {self._layers[-1].name: dy} if self._layers else {INPUT: dy}
        for i in reversed(self.order):
            layer = self._layers[i]
            if layer.name not in grads:
                raise ValueError(f"{type(self).__name__} {self.name!r}: the output of layer "
                                 f"{layer.name!r} feeds no other layer nor the output")
            d = grads.pop(layer.name)
            names = self.sources(i)
            if layer.name in self._fused:  # a fused ReLU's BN differentiates it
                pass
            elif (not input_grad and layer.input_grad_optional
                  and all(name == INPUT for name in names)):
                layer.backward(d, input_grad=False)
                continue
            else:
                d = layer.backward(d)
            for name, g in zip(names, d if getattr(layer, "multi_input", False) else [d],
                               strict=True):
                # An output used by several layers gets the sum of their gradients.
                grads[name] = g if name not in grads else grads[name] + g
        dy = grads.get(INPUT) if input_grad else None
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
                    raise ValueError(f"{type(self).__name__} {self.name!r}: two weights "
                                     f"named {key!r}")
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
                f"{type(self).__name__} {self.name!r}: weight dict lacks {missing[0]!r}"
                + (f" (and {len(missing) - 1} more: {missing[1:]})" if len(missing) > 1 else "")
            )
        extra = [k for k in values if k not in named]
        if extra:
            raise ValueError(
                f"{type(self).__name__} {self.name!r}: weight dict has unexpected tensor "
                f"{extra[0]!r} "
                f"(model weights: {', '.join(named)})"
            )
        for key, w in named.items():
            if np.shape(values[key]) != w.shape:
                raise ValueError(
                    f"{type(self).__name__} {self.name!r}: tensor {key!r} has shape "
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
                f"{type(self).__name__} {self.name!r} is not built: call "
                "build(input_shape) or the model on a batch first"
            )
        rows = [("Layer (name)", "Type", "Output shape", "Params")]
        shapes = {INPUT: self.input_shape}
        for i in self.order:
            layer = self._layers[i]
            shape = tuple(layer.compute_output_shape(self._inputs_of(i, shapes)))
            shapes[layer.name] = shape
            params = sum(w.value.size for w in layer.weights)
            kind = type(layer).__name__
            if self.sources(i) != Sequential.sources(self, i):
                kind += f" <- {', '.join(self.sources(i))}"
            rows.append((layer.name, kind, str(shape), f"{params:,}"))
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


class Model(Sequential):
    """Layers that name their inputs: residual blocks, branches and merges.

    Each layer takes the outputs of the layers its `inputs` entry names (`INPUT`, i.e.
    "input", is the model's input), by default the previous layer's, so a model
    without `inputs` is a `Sequential`. Layers that take several inputs (`Add`,
    `Concatenate`: `multi_input = True`) get a list. The model's output is the last
    layer's; every other layer's output must feed some layer. Backward sums the
    gradients of an output used by several layers.

    Args:
        layers: Layer instances (or layer config dicts), in any order that the graph
            allows (layers run in the order given when it is already one).
        inputs: {layer name: [source names]} for the layers that do not take the
            previous layer's output.
        name: the model's name; default a unique "model[_N]".

    Raises:
        ValueError: naming the layer, for an unknown source, a cycle, several sources
            for a single-input layer, or an output that feeds nothing.
    """

    def __init__(self, layers=None, inputs=None, name=None):
        self._wiring = {k: list(v) for k, v in (inputs or {}).items()}
        self._order = None
        super().__init__(layers, name=name)
        names = [la.name for la in self._layers]
        for key in self._wiring:
            if key not in names:
                raise ValueError(f"Model {self.name!r}: inputs are given for {key!r}, which "
                                 f"is not a layer (layers: {', '.join(names)})")
        self._order = self._sort()

    @classmethod
    def _default_name(cls) -> str:
        return "model"

    def add(self, layer) -> None:
        super().add(layer)
        if self._order is not None:
            self._order = self._sort()

    def sources(self, index: int) -> list[str]:
        name = self._layers[index].name
        return self._wiring[name] if name in self._wiring else super().sources(index)

    @property
    def order(self) -> list[int]:
        return list(self._order if self._order is not None else self._sort())

    def _sort(self) -> list[int]:
        """A topological order (stable: the given order where it already is one)."""
        index = {la.name: i for i, la in enumerate(self._layers)}
        for i, layer in enumerate(self._layers):
            srcs = self.sources(i)
            if not isinstance(srcs, list) or not srcs or not all(isinstance(s, str)
                                                                   for s in srcs):
                raise ValueError(f"Model {self.name!r}: layer {layer.name!r}: inputs must be "
                                 f"a non-empty list of layer names, got {srcs!r}")
            for src in srcs:
                if src != INPUT and src not in index:
                    close = [n for n in index if n.lower() == src.lower()]
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ValueError(f"Model {self.name!r}: layer {layer.name!r} takes "
                                     f"{src!r}, which is neither a layer nor {INPUT!r}"
                                     f"{hint}")
                if src == layer.name:
                    raise ValueError(f"Model {self.name!r}: layer {layer.name!r} takes its "
                                     "own output (a cycle)")
            if len(srcs) > 1 and not getattr(layer, "multi_input", False):
                raise ValueError(f"Model {self.name!r}: layer {layer.name!r} "
                                 f"({type(layer).__name__}) takes one input, got {srcs}; "
                                 "merge them first with Add or Concatenate")
        done, order, visiting = set(), [], []

        def visit(i):
            name = self._layers[i].name
            if name in done:
                return
            if name in visiting:
                cycle = visiting[visiting.index(name):] + [name]
                raise ValueError(f"Model {self.name!r}: the inputs form a cycle: "
                                 + " -> ".join(reversed(cycle)))
            visiting.append(name)
            for src in self.sources(i):
                if src != INPUT:
                    visit(index[src])
            visiting.pop()
            done.add(name)
            order.append(i)

        for i in range(len(self._layers)):
            visit(i)
        used = {src for i in range(len(self._layers)) for src in self.sources(i)}
        for layer in self._layers[:-1]:
            if layer.name not in used:
                raise ValueError(f"Model {self.name!r}: the output of layer {layer.name!r} "
                                 "feeds no other layer (the model's output is the last "
                                 f"layer's, {self._layers[-1].name!r})")
        return order

    def get_config(self) -> dict:
        """`{"name", "layers": [...], "inputs": {layer name: [sources]}}`."""
        return {**super().get_config(), "inputs": {k: list(v) for k, v in self._wiring.items()}}

    @classmethod
    def from_config(cls, config: dict) -> Model:
        return cls([registry.deserialize(c) for c in config.get("layers", [])],
                   inputs=config.get("inputs"), name=config.get("name"))

    def __repr__(self) -> str:
        return f"<Model name={self.name!r} layers={len(self._layers)} built={self.built}>"
