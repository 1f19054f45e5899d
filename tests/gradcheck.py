"""Central differences for the float64 gradient checks every backward gets."""

import numpy as np


def numeric_grad(f, arr, eps=1e-6):
    """d f() / d arr by central differences, perturbing `arr` in place (then restoring it).

    Args:
        f: a function of no arguments returning a float that reads `arr`.
        arr: a float64 array (modified and restored element by element).
        eps: the step.

    Returns:
        An array shaped like `arr`.
    """
    g = np.zeros_like(arr)
    for i in range(arr.size):  # .flat writes through for any layout, unlike reshape
        old = arr.flat[i]
        arr.flat[i] = old + eps
        up = f()
        arr.flat[i] = old - eps
        down = f()
        arr.flat[i] = old
        g.flat[i] = (up - down) / (2 * eps)
    return g
