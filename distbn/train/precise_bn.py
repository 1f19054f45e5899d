"""PreciseBN: BatchNormalization moving statistics recomputed as population statistics.

During training a BN layer's moving statistics are an exponential moving average of
batch statistics taken while the weights were still changing, so they lag the final
model, and at small batches they are a noisy estimate (Wu & Johnson, "Rethinking
'Batch' in BatchNorm", arXiv 2105.07576, Sec. 3). PreciseBN replaces them with the
statistics of the layer's inputs over many training batches, weights frozen.

`recompute_bn_statistics(model, batches, num_batches)`:

* Frozen weights: every forward runs in inference mode (`training=False`): no
  gradient, no moving-average update, no Dropout. What a layer sees is what it will
  see at evaluation.
* Layers in order: a BN layer's input depends on the earlier BN layers' statistics
  (in inference mode they normalise with them). fvcore's / detectron2's
  `update_bn_stats` collects every layer from the same forward passes, run in training
  mode, so a later layer's statistics are those of inputs normalised with *batch*
  statistics, not with the population statistics the earlier layers end up with. Here
  a layer is recomputed only once every BN layer it depends on has its final values,
  so each one gets the distribution of its inputs at evaluation. The cost is one pass
  of `num_batches` forwards per *depth* (the longest chain of BN layers above a
  layer), each forward stopping at the deepest layer of that pass: layers of the same
  depth (parallel branches of a `Model`, a residual block's projection shortcut) share
  a pass, which gives the same result as one pass per layer.
* Population statistics, pooled exactly: each rank merges its batches' per-channel
  (count, mean, M2) (Chan et al.'s pairwise update, float64), then the replicas'
  sums are merged with global counts: one all-reduce of [count, count·mean] gives the
  global mean μ, one of Σ M2_r + n_r(mean_r − μ)² the exact centred M2 (no shifted-sum
  cancellation, whatever the data's offset). Uneven and empty shards weigh exactly by
  their counts; N ranks give one process's result on the concatenated batches to
  float64 rounding, the same on every rank. The statistics pool over *all* replicas of
  the strategy, not a BN sync group: population statistics belong to the data and the
  frozen model, not to a normalization group (inference never uses a group), and one
  set on every rank is the model that is evaluated and saved.
* The variance stored is the biased population variance M2 / N, Keras' convention
  (its moving_variance averages biased batch variances). It is the variance of all
  N·B positions, so it includes the spread of the batch means, like fvcore's
  `_PopulationVarianceEstimator` (fvcore's default, `_MeanOfBatchVarianceEstimator`,
  averages PyTorch's Bessel-corrected per-batch variances, a different estimate at
  small batches; the paper's appendix prefers the population one).
* renorm=True: moving_mean and renorm_mean get the mean; moving_variance the variance;
  moving_stddev and renorm_stddev sqrt(var + epsilon), the quantity Keras' renorm
  averages into both, so training can go on from consistent values.
* virtual_batch_size (ghost batches): the population statistics of every position,
  not the mean over ghost batches of their variances that the moving average tracks:
  inference normalises every sample with one set of statistics, and the population's
  are the ones PreciseBN defines. At small ghost batches this differs from what
  training normalised with; that train/test difference is what `distbn compare`
  measures.
* Frozen layers (`trainable=False`) keep their statistics (as fvcore skips BN modules
  not in training mode); layers without moving statistics (GroupNormalization,
  LayerNormalization) have none to recompute.
"""

from __future__ import annotations

import itertools

import numpy as np

from distbn import ops
from distbn.distribute import get_strategy
from distbn.distribute.sharding import shard_slice
from distbn.train.data import BatchSchedule

__all__ = ["ScheduleBatches", "bn_passes", "recompute_bn_statistics"]

_F64 = np.float64


def bn_passes(model) -> list[list]:
    """The trainable layers with moving statistics, grouped by pass.

    Pass d holds the layers whose inputs depend (through `model.sources`) on BN layers of
    passes < d only, so recomputing the passes in order gives every layer inputs made
    with its predecessors' final statistics.

    Args:
        model: a `Sequential` or `Model`.

    Returns:
        A list of lists of layers (empty when the model has none).
    """
    layers = model.layers
    targets = {la.name for la in layers if la.has_moving_statistics and la.trainable}
    depth = {}  # name -> number of target BN layers on the longest chain ending there
    passes: list[list] = []
    for i in model.order:
        layer = layers[i]
        d = max((depth.get(s, 0) for s in model.sources(i)), default=0)
        if layer.name in targets:
            while len(passes) <= d:
                passes.append([])
            passes[d].append(layer)
            d += 1
        depth[layer.name] = d
    return passes


def _check_num_batches(num_batches) -> int:
    if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) \
            or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got num_batches={num_batches!r}")
    return int(num_batches)


def _split_item(item, k):
    """(x, mask) of one item of `batches`: an array, or an (x, mask) pair."""
    if isinstance(item, (tuple, list)):
        if len(item) != 2:
            raise TypeError(f"batches item {k}: expected an input array or an (x, mask) pair, "
                            f"got a {type(item).__name__} of length {len(item)}")
        return np.asarray(item[0]), None if item[1] is None else np.asarray(item[1])
    return np.asarray(item), None


def _keras_mask(mask, x):
    """A Keras mask (one dimension less than x, broadcast along its last axis) as a
    boolean array of x's rank; None stays None."""
    if mask is None:
        return None
    if mask.ndim != x.ndim - 1:
        raise ValueError(f"the mask must have one dimension less than the inputs; got "
                         f"mask.shape={mask.shape}, inputs.shape={x.shape}")
    return (mask if mask.dtype == bool else mask != 0).reshape(mask.shape + (1,))


class _Collector:
    """Per-channel (count, mean, M2) of one layer's inputs over this rank's batches."""

    def __init__(self, layer):
        self.layer = layer
        self.count = self.mean = self.m2 = None

    def add(self, x, mask) -> None:
        compute = np.dtype(self.layer.compute_dtype)
        # The layer casts its input to the compute dtype (float16 computed in float32).
        x = np.asarray(x, dtype=np.float32 if compute == np.float16 else compute)
        axis = self.layer.axis
        channels = sorted(a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis))
        red = ops.reduce_axes_for(x.ndim, channels)
        n, mean, m2 = ops.kernels().local_mean_m2(x, red, _keras_mask(mask, x))
        if self.count is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        # Chan et al.'s pairwise merge: exact for centred M2s, no cancellation.
        total = self.count + n
        safe = np.maximum(total, 1.0)
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / safe)
        self.m2 = self.m2 + m2 + np.square(delta) * (self.count * n / safe)
        self.count = total

    def local(self):
        """(count, mean, m2) float64 channel arrays; zeros before any batch."""
        if self.count is None:
            shape = self.layer.moving_mean.shape
            return np.zeros(shape), np.zeros(shape), np.zeros(shape)
        return self.count, self.mean, self.m2


def _prepare(model, batches):
    """Build an unbuilt model from the first item's shape; `(passes, problem)`, where
    problem is the exception to raise (after the replicas agreed), or None."""
    try:
        if not model.built:
            first = next(iter(batches), None)
            if first is None:
                raise ValueError("recompute_bn_statistics: the model is not built and "
                                 "batches yielded nothing to build it from")
            x, _ = _split_item(first, 0)
            model.build((None,) + x.shape[1:])
        return bn_passes(model), None
    except Exception as exc:  # noqa: BLE001 - raised once the replicas know
        return [], exc


def _run_pass(model, batches, num_batches, collectors) -> int:
    """Forward this rank's first `num_batches` items in inference mode, recording the
    inputs of the collectors' layers; stops each forward at the last of them.

    Returns:
        The number of items `batches` yielded (at most num_batches).
    """
    last = max(model.order.index(model.layers.index(c.layer)) for c in collectors)
    stop = model.layers[model.order[last]]
    wrapped = []
    for c in collectors:
        # The wrapper sees exactly the (x, mask) the model gives the layer, whatever the
        # model's wiring and mask propagation; the instance attribute is deleted after.
        def record(x, training=None, mask=None, _call=c.layer.call, _c=c):
            y = _call(x, training=False, mask=mask)
            _c.add(x, None if mask is None else np.asarray(mask))
            return y

        c.layer.call = record
        wrapped.append(c.layer)
    seen = 0
    try:
        for k, item in enumerate(itertools.islice(iter(batches), num_batches)):
            x, mask = _split_item(item, k)
            seen += 1
            for layer, _ in model.layer_outputs(x, training=False, mask=mask):
                if layer is stop:
                    break  # the layers after the pass's last one are not needed
    finally:
        for layer in wrapped:
            del layer.call
    return seen


def _pool(strategy, collectors, failed, short):
    """Global (count, mean, var) per collector: exact merge over all replicas.

    Returns:
        (results, failed_ranks, short_ranks): results a list of (count, mean, var)
        float64 channel arrays, identical on every rank; the numbers of replicas whose
        pass raised or whose `batches` ran short.
    """
    parts = [c.local() for c in collectors]
    sizes = [p[0].size for p in parts]
    head = np.array([float(failed), float(short)])
    buf = np.concatenate([head] + [np.concatenate([n.ravel(), (n * m).ravel()])
                                   for n, m, _ in parts])
    strategy.all_reduce(buf, op="sum", name="precise_bn.mean")
    failed_ranks, short_ranks = int(buf[0]), int(buf[1])
    if failed_ranks or short_ranks:
        return None, failed_ranks, short_ranks
    totals, means, offset = [], [], 2
    for size in sizes:
        total, s1 = buf[offset:offset + size], buf[offset + size:offset + 2 * size]
        offset += 2 * size
        totals.append(total)
        means.append(np.divide(s1, total, out=np.zeros(size), where=total > 0))
    # Σ_r M2_r + n_r (mean_r − μ)²: the exact centred sum about the global mean.
    centred = np.concatenate([(m2.ravel() + n.ravel() * np.square(m.ravel() - mu))
                              for (n, m, m2), mu in zip(parts, means, strict=True)])
    strategy.all_reduce(centred, op="sum", name="precise_bn.m2")
    results, offset = [], 0
    for (n, _, _), total, mu in zip(parts, totals, means, strict=True):
        size = n.size
        var = centred[offset:offset + size] / np.maximum(total, 1.0)
        offset += size
        shape = n.shape
        results.append((total.reshape(shape), mu.reshape(shape), var.reshape(shape)))
    return results, 0, 0


def _assign(layer, count, mean, var) -> dict:
    """Store population statistics in a layer (channels with no position keep theirs).

    Returns:
        The layer's summary entry.
    """
    old_mean = layer.moving_mean.numpy().astype(_F64)
    old_var = layer.moving_variance.numpy().astype(_F64)
    seen = count > 0
    mean = np.where(seen, mean, old_mean)
    var = np.where(seen, var, old_var)
    layer.moving_mean.assign(mean)
    layer.moving_variance.assign(var)
    if getattr(layer, "renorm", False):
        stddev = np.sqrt(var + layer.epsilon)
        layer.moving_stddev.assign(np.where(seen, stddev, layer.moving_stddev.numpy()))
        layer.renorm_mean.assign(np.where(seen, mean, layer.renorm_mean.numpy()))
        layer.renorm_stddev.assign(np.where(seen, stddev, layer.renorm_stddev.numpy()))
    new_mean = layer.moving_mean.numpy().astype(_F64)
    new_var = layer.moving_variance.numpy().astype(_F64)
    return {"count": int(np.max(count, initial=0)),
            "mean_change": float(np.max(np.abs(new_mean - old_mean), initial=0.0)),
            "var_change": float(np.max(np.abs(new_var - old_var), initial=0.0))}


def recompute_bn_statistics(model, batches, num_batches, strategy=None, progress=None) -> dict:
    """PreciseBN: set every BN layer's moving statistics to population statistics.

    Collective: every replica of `strategy` calls it with its own shard of the same
    global batches (the same number of items; a shard may be empty). See the module
    docstring for the semantics (inference-mode forwards, layers in order, exact pooling
    over all replicas, Keras' biased variance, renorm and ghost batches).

    Args:
        model: a built or unbuilt `Sequential`/`Model`; its trainable layers with
            `has_moving_statistics` are recomputed, in place.
        batches: an iterable of this rank's input for each global batch: an array, or
            an `(x, mask)` pair for a model fed masks (as the trainer feeds them). A
            re-iterable (list, `ScheduleBatches`) is read once per pass; a one-shot
            iterator is read once and its first `num_batches` items kept in memory.
        num_batches: how many items to use (an int >= 1).
        strategy: the replicas to pool over (default `distbn.get_strategy()`).
        progress: None, or a `distbn.train.progress.Progress` (its `message` gets one
            line per pass).

    Returns:
        `{layer name: {"count", "mean_change", "var_change", "pass"}}`: the global
        number of positions per channel (the largest over channels), the largest
        |new − old| of moving_mean and of moving_variance, and the pass (0-based) that
        recomputed it. count and pass are the same on every rank; the changes are
        from this rank's own previous statistics (replica-local ones differ). Empty
        for a model without BN layers.

    Raises:
        ValueError: `num_batches` < 1; `batches` yielded fewer than `num_batches` items
            on some replica (every rank raises; nothing is changed); non-finite
            population statistics. TypeError: an item that is neither an array nor a
            pair. Any error in a forward (on any rank) restores the statistics on every
            rank and raises there.
    """
    num_batches = _check_num_batches(num_batches)
    strategy = get_strategy() if strategy is None else strategy
    if iter(batches) is batches:  # a one-shot iterator: every pass needs the same items
        batches = list(itertools.islice(batches, num_batches))
    passes, problem = _prepare(model, batches)
    # Every replica must run the same passes (each ends in collectives): agree first.
    agree = strategy.all_reduce(np.array([float(problem is not None), float(len(passes))]),
                                op="sum", name="precise_bn.passes")
    world = strategy.num_replicas_in_sync
    if problem is not None:
        raise problem
    if agree[0]:
        raise RuntimeError(f"recompute_bn_statistics: {int(agree[0])} other replica(s) "
                           "could not build the model from their first batch")
    if agree[1] != world * len(passes):
        raise RuntimeError(f"recompute_bn_statistics: the replicas' models differ ({len(passes)} "
                           "passes here, another number elsewhere)")
    layers = [la for group in passes for la in group]
    saved = [(v, v.numpy()) for la in layers for v in la.non_trainable_weights]
    summary = {}
    try:
        for p, group in enumerate(passes):
            if progress is not None:
                progress.message(f"precise_bn: pass {p + 1}/{len(passes)} over {num_batches} "
                                 f"batches: {', '.join(la.name for la in group)}")
            collectors = [_Collector(la) for la in group]
            error, seen = None, 0
            try:
                seen = _run_pass(model, batches, num_batches, collectors)
            except Exception as exc:  # noqa: BLE001 - shared with the other replicas first
                error = exc
            short = error is None and seen < num_batches
            results, failed_ranks, short_ranks = _pool(strategy, collectors, error is not None,
                                                       short)
            if error is not None:
                raise error
            if failed_ranks:
                raise RuntimeError(f"recompute_bn_statistics: the forward failed on "
                                   f"{failed_ranks} other replica(s) in pass {p + 1}")
            if short_ranks:
                mine = f"; this replica's yielded {seen}" if short else ""
                raise ValueError(
                    f"batches yielded fewer than num_batches={num_batches} items on "
                    f"{short_ranks} of {strategy.num_replicas_in_sync} replica(s){mine}")
            for la, (count, mean, var) in zip(group, results, strict=True):
                if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var))):
                    raise ValueError(
                        f"recompute_bn_statistics: layer {la.name!r} has non-finite "
                        f"population statistics over {num_batches} batches (a NaN or inf "
                        "in its inputs)")
                summary[la.name] = dict(_assign(la, count, mean, var), **{"pass": p})
    except BaseException:
        for var, value in saved:
            var.assign(value)
        raise
    return summary


class ScheduleBatches:
    """This rank's shards of the first global batches of a training schedule.

    Global batch k is the batch of training step k (`BatchSchedule.batch_at(k)`: the
    seed's epoch permutation, running on across epochs); the rank takes its contiguous
    `shard_slice`, as the trainer does, so N ranks read exactly one process's batches.
    Re-iterable: every pass of `recompute_bn_statistics` reads the same items.

    Args:
        x: the training inputs (any array indexable by an int array).
        mask: None, or the (N, steps) training mask (items are then (x, mask) pairs).
        global_batch_size, seed, drop_last: the schedule (`train.global_batch_size`,
            `seed`, `train.drop_last`).
        num_batches: how many global batches (>= 1).
        rank, world: this replica's id and the number of replicas.
    """

    def __init__(self, x, mask, global_batch_size, seed, drop_last, num_batches, rank, world):
        self.x, self.mask = x, mask
        self.num_batches = _check_num_batches(num_batches)
        self.schedule = BatchSchedule(len(x), global_batch_size, seed, drop_last)
        self.rank, self.world = rank, world

    @classmethod
    def from_trainer(cls, trainer, num_batches):
        """The schedule of a `Trainer`'s config and training data, for its rank."""
        t = trainer.config.train
        return cls(trainer.dataset.x_train, getattr(trainer.dataset, "mask_train", None),
                   t.global_batch_size, trainer.config.seed, t.drop_last, num_batches,
                   trainer.rank, trainer.world)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for step in range(self.num_batches):
            _, _, indices = self.schedule.batch_at(step)
            local = indices[shard_slice(len(indices), self.rank, self.world)]
            x = self.x[local]
            yield x if self.mask is None else (x, self.mask[local])
