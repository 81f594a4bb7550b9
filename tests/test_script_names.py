"""Scripts run as `python bench/X.py` (or bench/tools/X.py) put their own folder first on sys.path, so a file there
named like an installed or standard-library module hides that module from everything the script imports.
bench/kernels.py did: transformers >= 5 imports the `kernels` package (Hugging Face's hub kernels), found
bench/kernels.py instead, and every other bench script that loads a model failed with an ImportError."""
from __future__ import annotations

import importlib.machinery
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIRS = [ROOT / "bench", ROOT / "bench" / "tools"]


def _outside_repo_path() -> list[str]:
    """sys.path without the checkout (the working directory, the repo, tests/): where installed modules live."""
    keep = []
    for entry in sys.path:
        path = Path(os.path.abspath(entry or os.curdir))
        if path != ROOT and ROOT not in path.parents:
            keep.append(str(path))
    return keep


def _shadowed(stem: str, path: list[str]) -> str | None:
    if stem in sys.builtin_module_names:
        return "a built-in module"
    spec = importlib.machinery.PathFinder.find_spec(stem, path)
    return None if spec is None else (spec.origin or "a namespace package")


@pytest.mark.parametrize("folder", SCRIPT_DIRS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_do_not_shadow_installed_modules(folder: Path) -> None:
    path = _outside_repo_path()
    clashes = {f.name: where for f in sorted(folder.glob("*.py")) if (where := _shadowed(f.stem, path))}
    assert not clashes, f"rename these scripts, their names hide modules other code imports: {clashes}"


def test_the_check_sees_a_clash() -> None:
    path = _outside_repo_path()
    assert _shadowed("json", path) is not None  # the standard library's
    assert _shadowed("torch", path) is not None  # an installed package
    assert _shadowed("latency", path) is None
