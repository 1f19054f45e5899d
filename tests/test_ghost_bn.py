"""Ghost batch normalization (`virtual_batch_size`, tf-keras 2 semantics)."""

import numpy as np
import pytest
from gradcheck import numeric_grad

from distbn import BatchNormalization


def _per_ghost_reference(x, dy, k, axis, weights, momentum):
    """Plain BN on each ghost batch x[j::B/k]; moving stats from the averaged moments."""
    ghosts = x.shape[0] // k
    y, dx = np.empty_like(x), np.empty_like(x)
    dgamma = dbeta = 0.0
    means, variances = [], []
    for j in range(ghosts):
        bn = BatchNormalization(axis=axis, dtype="float64", momentum=0.0)
        bn.build(x.shape)
        bn.set_weights(weights)
        y[j::ghosts] = bn(x[j::ghosts], training=True)
        dx[j::ghosts] = bn.backward(dy[j::ghosts])
        dgamma, dbeta = dgamma + bn.gamma.grad, dbeta + bn.beta.grad
        means.append(bn.moving_mean.numpy())
        variances.append(bn.moving_variance.numpy())
    mm = weights[2] * momentum + np.mean(means, 0) * (1 - momentum)
    mv = weights[3] * momentum + np.mean(variances, 0) * (1 - momentum)
    return y, dx, dgamma, dbeta, mm, mv


@pytest.mark.parametrize("shape,axis,k", [((12, 3), -1, 4), ((8, 3, 2, 2), 1, 2),
                                          ((6, 2, 5), -1, 6), ((6, 4), -1, 1)])
def test_ghost_batches_are_strided_samples_with_their_own_statistics(shape, axis, k):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.5, shape)
    dy = rng.normal(size=shape)
    c = shape[axis]
    weights = [rng.normal(1, .3, c), rng.normal(0, .3, c), rng.normal(0, .3, c),
               rng.random(c) + .5]
    bn = BatchNormalization(axis=axis, virtual_batch_size=k, momentum=0.8, dtype="float64")
    bn.build(shape)
    assert [w.shape for w in bn.weights] == [(c,)] * 4
    bn.set_weights(weights)
    y = bn(x, training=True)
    dx = bn.backward(dy)
    y_ref, dx_ref, dg, db, mm, mv = _per_ghost_reference(x, dy, k, axis, weights, 0.8)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(bn.gamma.grad, dg, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(bn.beta.grad, db, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(bn.moving_mean.numpy(), mm, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bn.moving_variance.numpy(), mv, rtol=1e-12)
    # inference is unchanged: the moving statistics, any batch size
    plain = BatchNormalization(axis=axis, dtype="float64")
    plain.build(shape)
    plain.set_weights(bn.get_weights())
    x5 = rng.normal(size=(5,) + shape[1:])
    np.testing.assert_allclose(bn(x5, training=False), plain(x5, training=False), rtol=1e-14)


def test_backward_matches_central_differences():
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, (6, 2, 3))
    w = rng.normal(size=x.shape)
    bn = BatchNormalization(virtual_batch_size=3, dtype="float64")
    bn.build(x.shape)
    bn.set_weights([rng.normal(1, .3, 3), rng.normal(0, .3, 3), np.zeros(3), np.ones(3)])
    saved = bn.get_weights()
    bn(x, training=True)
    dx = bn.backward(w)

    def f():
        bn.set_weights(saved)
        return float(np.sum(w * bn(x, training=True)))

    np.testing.assert_allclose(dx, numeric_grad(f, x), rtol=1e-6, atol=1e-8)


def test_ghost_renorm_uses_the_averaged_moments_for_r_d_and_updates():
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, (8, 3))
    bn = BatchNormalization(virtual_batch_size=4, renorm=True, dtype="float64",
                            renorm_clipping={"rmax": 1.5, "dmax": 0.5})
    y = bn(x, training=True)
    ghosts = [x[j::2] for j in range(2)]
    mu = np.mean([g.mean(0) for g in ghosts], 0)
    var = np.mean([g.var(0) for g in ghosts], 0)
    s = np.sqrt(var + 1e-3)
    r, d = np.minimum(s, 1.5), np.clip(mu, -0.5, 0.5)
    for j, g in enumerate(ghosts):
        xhat = (g - g.mean(0)) / np.sqrt(g.var(0) + 1e-3)
        np.testing.assert_allclose(y[j::2], xhat * r + d, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.renorm_mean.numpy(), 0.01 * mu, rtol=1e-12)
    np.testing.assert_allclose(bn.moving_stddev.numpy(), 0.99 + 0.01 * s, rtol=1e-12)
    bn.backward(np.ones_like(y))
    assert np.all(np.isfinite(bn.gamma.grad))


def test_errors_name_what_they_got():
    bn = BatchNormalization(virtual_batch_size=4)
    with pytest.raises(ValueError, match=r"virtual_batch_size=4 does not divide the batch "
                                         r"size 6"):
        bn(np.ones((6, 3), np.float32), training=True)
    bn(np.ones((6, 3), np.float32), training=False)  # inference: any batch size
    with pytest.raises(ValueError, match="mask"):
        bn(np.ones((8, 3), np.float32), training=True, mask=np.ones(8, bool))
    with pytest.raises(ValueError, match="virtual_batch_size=0"):
        BatchNormalization(virtual_batch_size=0)
    with pytest.raises(ValueError, match="virtual_batch_size=2.5"):
        BatchNormalization(virtual_batch_size=2.5)
    with pytest.raises(ValueError, match="synchronized=True"):
        BatchNormalization(virtual_batch_size=2, synchronized=True)
    with pytest.raises(ValueError, match="axis 0"):
        BatchNormalization(axis=0, virtual_batch_size=2)(np.ones((4, 3)))


def test_config_and_tf_keras_weight_shapes():
    bn = BatchNormalization(virtual_batch_size=4, renorm=True)
    cfg = bn.get_config()
    assert cfg["virtual_batch_size"] == 4
    assert BatchNormalization.from_config(cfg).get_config() == cfg
    bn.build((8, 3))
    tf_shaped = [np.full((1, 1, 3), i, np.float32) for i in range(7)]  # tf-keras' shapes
    bn.set_weights(tf_shaped)
    assert [w.shape for w in bn.get_weights()] == [(3,)] * 7
    with pytest.raises(ValueError, match="shape"):
        bn.set_weights([np.ones((2, 3))] * 7)
    empty = bn(np.zeros((0, 3), np.float32), training=True)
    assert empty.shape == (0, 3)


def test_matches_tf_keras():
    """tf-keras 2 itself (skipped unless tensorflow and tf-keras are installed)."""
    tf = pytest.importorskip("tensorflow")
    tf_keras = pytest.importorskip("tf_keras")
    rng = np.random.default_rng(3)
    cases = [((12, 4), -1, 3, {}), ((8, 3, 2, 2), 1, 4, {}), ((8, 2, 3), -1, 2,
             {"renorm": True, "renorm_clipping": {"rmax": 1.4, "dmax": 0.3},
              "renorm_momentum": 0.7})]
    for shape, axis, k, extra in cases:
        kw = dict(axis=axis, momentum=0.8, epsilon=1e-3, virtual_batch_size=k, **extra)
        tl = tf_keras.layers.BatchNormalization(**kw)
        dl = BatchNormalization(**kw)
        tl.build(shape)
        dl.build(shape)
        assert [v.name.split("/")[-1].split(":")[0] for v in tl.weights] == \
            [v.name for v in dl.weights]
        dl.set_weights(tl.get_weights())
        for _ in range(3):
            x = rng.normal(1.0, 2.0, shape).astype(np.float32)
            w = rng.normal(size=shape).astype(np.float32)
            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                out = tl(xt, training=True)
                loss = tf.reduce_sum(out * w)
            grads = tape.gradient(loss, [xt] + tl.trainable_weights)
            y = dl(x, training=True)
            dx = dl.backward(w)
            np.testing.assert_allclose(y, out.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(dx, grads[0].numpy(), rtol=1e-3, atol=1e-4)
            np.testing.assert_allclose(dl.gamma.grad, grads[1].numpy().reshape(-1),
                                       rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(dl.beta.grad, grads[2].numpy().reshape(-1),
                                       rtol=1e-4, atol=1e-4)
            for tv, dv in zip(tl.weights, dl.weights, strict=True):
                np.testing.assert_allclose(dv.numpy(), tv.numpy().reshape(-1), rtol=1e-5,
                                           atol=1e-6, err_msg=dv.name)
        x = rng.normal(size=(5,) + shape[1:]).astype(np.float32)
        np.testing.assert_allclose(dl(x, training=False), tl(x, training=False).numpy(),
                                   rtol=1e-5, atol=1e-5)
