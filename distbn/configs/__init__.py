"""The YAML configs distbn's commands default to, shipped inside the package.

`distbn bench` (scaling suite) trains `quickstart.yaml`; `distbn compare` without CONFIG
studies `study.yaml`; `rethinking-bn.yaml` is the normalization-batch study
(`distbn compare configs/rethinking-bn.yaml`). They are package data, so a plain
`pip install .` has them too; the clone's top-level `configs/quickstart.yaml`,
`configs/study.yaml` and `configs/rethinking-bn.yaml` are links to these files (one
copy).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["NAMES", "packaged_config"]

#: The shipped configs, by file name.
NAMES = ("quickstart.yaml", "study.yaml", "rethinking-bn.yaml")


def packaged_config(name: str) -> Path:
    """The path of a config shipped with distbn.

    Args:
        name: one of `NAMES` ("quickstart.yaml", or "quickstart" without the suffix).

    Returns:
        The file's path inside the installed package.

    Raises:
        ValueError: an unknown name, quoted, with the known ones.
        FileNotFoundError: the installation lacks the file (a broken install).
    """
    file = name if str(name).endswith(".yaml") else f"{name}.yaml"
    if file not in NAMES:
        raise ValueError(f"no packaged config {name!r}; packaged: {', '.join(NAMES)}")
    # The package is installed as plain files (never zipped), so this is a real path.
    path = Path(str(resources.files(__name__).joinpath(file)))
    if not path.is_file():
        raise FileNotFoundError(f"packaged config {file!r} is missing from {path.parent}; "
                                "reinstall distbn")
    return path
