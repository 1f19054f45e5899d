"""The one place distbn.torch imports PyTorch, with an error that names the extra."""

from __future__ import annotations

__all__ = ["require_torch"]

_INSTALL_HINT = 'pip install -e ".[torch]"'


def require_torch():
    """Import and return the `torch` module.

    Returns:
        The `torch` module.

    Raises:
        ImportError: torch is not installed; the message names distbn's `torch` extra.
    """
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            "distbn.torch needs PyTorch, which is not installed: install distbn's "
            f"'torch' extra ({_INSTALL_HINT} in the distbn clone, or pip install torch); "
            f"the underlying error was: {exc}"
        ) from exc
    return torch
