"""distbn.keras in one process: Keras parity of the synchronized code path, serialization,
convert_sync_batchnorm, the data-parallel helpers at one replica, and errors.

The synchronized path is exercised alone through a loopback strategy (a sync group of
"two" whose all-reduce returns its input), so the host callback, the custom gradient and
jit run without MPI; tests/mpi_keras checks the real thing at 2 and 3 ranks. Runs on the
active Keras backend (jax by default; torch when KERAS_BACKEND=torch).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")
if keras.backend.backend() not in ("jax", "torch"):
    pytest.skip("distbn.keras supports the jax and torch backends", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent / "mpi_keras"))
from keras_helpers import TrainCall, bn_weights, layer_pair, to_numpy  # noqa: E402

import distbn  # noqa: E402
import distbn.keras as dk  # noqa: E402

TOL = 2e-5


class Loopback(distbn.LocalStrategy):
    """One process pretending to be a sync group of two: sums are the local ones."""

    def __init__(self, replicas=1, replica_id=0):
        self.calls = 0
        self._replicas, self._id = replicas, replica_id

    @property
    def sync_group_size(self):
        return 2

    @property
    def num_replicas_in_sync(self):
        return self._replicas

    @property
    def replica_id(self):
        return self._id

    def sync_all_reduce(self, buf, name=None):
        self.calls += 1
        return buf


def scaled(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1.0))


def in_scope(strategy):
    def make(factory):
        with strategy.scope():
            return factory()
    return make


@pytest.mark.parametrize("masked,axis", [(False, -1), (True, -1), (True, 1)])
def test_synchronized_path_equals_keras(masked, axis):
    rng = np.random.default_rng(1)
    shape = (9, 5, 4) if axis == -1 else (9, 4, 5)
    strategy = Loopback()
    sync, plain = layer_pair(in_scope(strategy), bn_weights(rng, shape[axis]), shape,
                             axis=axis, momentum=0.5)
    run_sync, run_plain = TrainCall(sync), TrainCall(plain)
    for step in range(2):
        x = rng.normal(3.0 + step, 2.0, shape).astype("float32")
        dy = rng.normal(size=shape).astype("float32")
        mask = rng.random(shape[:-1]) < 0.6 if masked else None
        got, want = run_sync(x, dy, mask), run_plain(x, dy, mask)
        for what, a, b in zip(("y", "dx"), got[:2], want[:2], strict=True):
            assert scaled(a, b) <= TOL, (step, what)
        for a, b in zip(got[2], want[2], strict=True):
            assert scaled(a, b) <= TOL, (step, "gamma/beta")
        for a, b in zip(sync.non_trainable_weights, plain.non_trainable_weights, strict=True):
            assert scaled(to_numpy(a), to_numpy(b)) <= TOL, (step, a.name)
    assert strategy.calls == 4  # forward + backward per step
    # Inference: moving statistics, no collective.
    y = sync(x, training=False)
    assert strategy.calls == 4
    assert scaled(to_numpy(y), to_numpy(plain(x, training=False))) <= TOL


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's host callbacks")
@pytest.mark.parametrize("masked", [False, True])
def test_jax_callbacks_carry_channel_buffers_not_activations(masked):
    # The moments are XLA's work: a training step's host callbacks (forward and
    # backward) take and give only per-channel buffers, never the activation.
    import jax

    rng = np.random.default_rng(3)
    shape, channels = (8, 6, 5), 5
    sync, _ = layer_pair(in_scope(Loopback()), bn_weights(rng, channels), shape)
    x = rng.normal(size=shape).astype("float32")
    mask = rng.random(shape[:-1]) < 0.6 if masked else None
    tv = [v.value for v in sync.trainable_variables]
    ntv = [v.value for v in sync.non_trainable_variables]

    def loss(xx, tv):
        return sync.stateless_call(tv, ntv, xx, training=True, mask=mask)[0].sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, tv)
    shapes = []

    def visit(jp):
        for eqn in jp.eqns:
            if "callback" in eqn.primitive.name:
                shapes.append(([tuple(v.aval.shape) for v in eqn.invars
                                if hasattr(v.aval, "shape")],
                               [tuple(v.aval.shape) for v in eqn.outvars]))
            for value in eqn.params.values():  # jit, custom_vjp, cond bodies
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        visit(sub)

    visit(jaxpr.jaxpr)
    assert len(shapes) == 2, shapes  # one forward, one backward collective
    for ins, outs in shapes:
        for s in ins + outs:
            assert s in ((3, channels), (2, channels), (channels,), ()), shapes


def test_one_replica_and_unsynchronized_are_plain_keras():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 3)).astype("float32")
    mask = rng.random((6,)) < 0.5
    with distbn.LocalStrategy().scope():
        one = dk.layers.BatchNormalization(synchronized=True)
    local = dk.layers.BatchNormalization()
    plain = keras.layers.BatchNormalization()
    for m in (None, mask):
        ys = [to_numpy(layer(x, training=True, mask=m)) for layer in (one, local, plain)]
        np.testing.assert_allclose(ys[0], ys[2], rtol=0, atol=1e-6)
        np.testing.assert_allclose(ys[1], ys[2], rtol=0, atol=1e-6)
    assert local.strategy is None and one.synchronized and not local.synchronized
    assert isinstance(one, keras.layers.BatchNormalization)


def test_config_and_keras_file_round_trip(tmp_path):
    layer = dk.layers.BatchNormalization(synchronized=True, momentum=0.9, epsilon=1e-4,
                                         renorm=True, renorm_clipping={"rmax": 2.0})
    cfg = layer.get_config()
    assert cfg["synchronized"] is True and cfg["renorm"] is True
    again = dk.layers.BatchNormalization.from_config(cfg)
    assert again.get_config() == cfg

    model = keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(3),
                              dk.layers.BatchNormalization(synchronized=True, momentum=0.7)])
    x = np.random.default_rng(0).normal(size=(5, 4, 3)).astype("float32")
    model(x, training=True)  # moving statistics move
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    bn = loaded.layers[-1]
    assert type(bn) is dk.layers.BatchNormalization and bn.synchronized
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), atol=1e-6)


def _nested_model():
    inner = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(3, 3),
                              keras.layers.BatchNormalization(axis=-1)], name="inner")
    inp = keras.Input((6, 6, 2))
    h = inner(inp)
    h = keras.layers.BatchNormalization(momentum=0.5, name="outer_bn")(h)
    out = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    return keras.Model(inp, out)


def _bn_layers(model):
    return [la for la in model._flatten_layers() if isinstance(la, keras.layers.BatchNormalization)]


def test_convert_sync_batchnorm():
    model = _nested_model()
    x = np.random.default_rng(0).normal(size=(4, 6, 6, 2)).astype("float32")
    model(x, training=True)
    converted = dk.convert_sync_batchnorm(model)
    new_bn = _bn_layers(converted)
    assert len(new_bn) == 2
    assert all(type(la) is dk.layers.BatchNormalization and la.synchronized for la in new_bn)
    assert all(type(la) is keras.layers.BatchNormalization for la in _bn_layers(model))
    assert [la.momentum for la in new_bn] == [la.momentum for la in _bn_layers(model)]
    for a, b in zip(model.get_weights(), converted.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(to_numpy(converted(x)), to_numpy(model(x)), atol=1e-6)
    local = dk.convert_sync_batchnorm(model, synchronized=False)
    assert not any(la.synchronized for la in _bn_layers(local))


def test_convert_rejects_subclassed_models():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="Sequential or Functional"):
        dk.convert_sync_batchnorm(Sub())


def test_fit_at_one_replica_with_wrappers_and_saved_optimizer(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = (x.sum(1) > 0).astype("int32")

    def make():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                                 dk.layers.BatchNormalization(synchronized=True),
                                 keras.layers.Dense(2)])

    histories, weights = [], []
    for wrap in (False, True):
        model = make()
        opt = keras.optimizers.SGD(0.1, momentum=0.5)
        model.compile(optimizer=dk.DistributedOptimizer(opt) if wrap else opt,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        cbs = ([dk.callbacks.BroadcastGlobalVariablesCallback(0),
                dk.callbacks.MetricAverageCallback()] if wrap else [])
        histories.append(model.fit(x, y, batch_size=dk.local_batch_size(8), epochs=2,
                                   shuffle=False, verbose=0, callbacks=cbs).history["loss"])
        weights.append(model.get_weights())
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-6)
    for a, b in zip(*weights, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert isinstance(model.optimizer, keras.optimizers.SGD)
    assert type(model.optimizer).__name__ == "SGD"
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    # Loads back as the plain class (torch's backend has its own SGD subclass).
    assert isinstance(loaded.optimizer, keras.optimizers.SGD)
    assert not hasattr(loaded.optimizer, "_distbn_strategy")


def test_shard_gives_each_rank_its_part_of_every_global_batch():
    data = np.arange(14)
    parts = [dk.shard(data, global_batch_size=4, strategy=Loopback(2, r)) for r in (0, 1)]
    np.testing.assert_array_equal(parts[0], [0, 1, 4, 5, 8, 9])
    np.testing.assert_array_equal(parts[1], [2, 3, 6, 7, 10, 11])
    kept = dk.shard(data, global_batch_size=4, drop_remainder=False, strategy=Loopback(2, 1))
    np.testing.assert_array_equal(kept, [2, 3, 6, 7, 10, 11, 13])
    a, b = dk.shard(data, data * 2, strategy=Loopback(3, 2))  # contiguous, sizes 5, 5, 4
    np.testing.assert_array_equal(a, [10, 11, 12, 13])
    np.testing.assert_array_equal(b, a * 2)
    assert dk.local_batch_size(6, strategy=Loopback(3, 0)) == 2


def test_errors_name_what_they_got():
    with pytest.raises(TypeError, match="synchronized='yes'"):
        dk.layers.BatchNormalization(synchronized="yes")
    with pytest.raises(TypeError, match="Optimizer instance"):
        dk.DistributedOptimizer("sgd")
    built = keras.optimizers.SGD()
    built.build([keras.Variable(np.zeros(2, "float32"))])
    with pytest.raises(ValueError, match="not been built"):
        dk.DistributedOptimizer(built)
    with pytest.raises(ValueError, match="bucket_bytes"):
        dk.DistributedOptimizer(keras.optimizers.SGD(), bucket_bytes=0)
    with pytest.raises(ValueError, match="global_batch_size=5 is not a multiple"):
        dk.shard(np.arange(10), global_batch_size=5, strategy=Loopback(2, 0))
    with pytest.raises(ValueError, match="same length"):
        dk.shard(np.arange(3), np.arange(4))
    with pytest.raises(ValueError, match="do not split"):
        dk.shard(np.arange(9), global_batch_size=4, drop_remainder=False,
                 strategy=Loopback(2, 0))
    with pytest.raises(ValueError, match="root_rank"):
        dk.callbacks.BroadcastGlobalVariablesCallback(-1)
    with Loopback().scope():
        bn = dk.layers.BatchNormalization(synchronized=True)
    with pytest.raises(ValueError, match="mask provided should be one dimension less"):
        bn(np.zeros((2, 3), "float32"), training=True, mask=np.ones((2, 3), bool))


def test_import_error_names_the_extra():
    code = ("import sys; sys.modules['keras'] = None\n"
            "try:\n    import distbn.keras\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert 'pip install -e ".[keras]"' in out


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the XLA FFI path is JAX's")
def test_other_ffi_abi_warns_and_keeps_the_python_path(monkeypatch, tmp_path):
    import jax

    from distbn.keras import _xla_ffi

    api = tmp_path / "xla" / "ffi" / "api"
    api.mkdir(parents=True)
    (api / "c_api.h").write_text("#define XLA_FFI_API_MAJOR 1\n")
    monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(tmp_path))
    monkeypatch.setattr(_xla_ffi, "_ABI", [])
    with pytest.warns(RuntimeWarning, match="major version is 1"):
        assert not _xla_ffi.abi_supported()
    monkeypatch.setattr(_xla_ffi, "_ABI", [])
    monkeypatch.undo()
    assert _xla_ffi.abi_supported()  # the installed jaxlib's
