"""The layering rule (docs/architecture.md) is enforced by import-linter's contracts in
pyproject.toml: the tree passes, and a deliberate upward import is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).parent / "lint-imports"

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"),
                           "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def _copy(tmp_path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copytree(REPO / "distbn", root / "distbn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.mark.parametrize("module,line,contract", [
    ("distbn/ops/_bad_import.py", "import distbn.distribute\n", "Layers"),
    ("distbn/layers/_bad_import.py", "from distbn.train import trainer\n", "Layers"),
    ("distbn/torch/_bad_import.py", "import distbn.models\n", "Layers"),
    ("distbn/keras/_bad_import.py", "from distbn.layers import BatchNormalization\n", "Layers"),
    ("distbn/layers/_bad_import.py", "from distbn.faults import maybe_fail\n", "Fault hook"),
])
def test_a_wrong_import_breaks_a_contract(tmp_path, module, line, contract):
    root = _copy(tmp_path)
    res = _lint(root)
    assert res.returncode == 0, res.stdout + res.stderr  # the copy itself passes
    init = (root / module).parent / "__init__.py"
    if not init.exists():  # an adapter package not written yet
        init.write_text("")
    (root / module).write_text(line)
    res = _lint(root)
    assert res.returncode != 0, res.stdout
    assert f"{contract}" in res.stdout and "BROKEN" in res.stdout, res.stdout
    assert "_bad_import" in res.stdout  # the report names the offending module
