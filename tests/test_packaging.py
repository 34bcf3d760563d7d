"""What a built wheel (`pip install ens`, not the editable install the tests run on) holds: every package of
pipelines/. A plain `packages = ["pipelines"]` left pipelines.data and pipelines.train out of the wheel."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _packaged() -> set[str]:
    """The packages setuptools puts in the wheel, as pyproject.toml declares them (a list, or `find`, which in
    pyproject.toml finds namespace packages too: pipelines/ has no __init__.py)."""
    from setuptools import find_namespace_packages, find_packages

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    if isinstance(declared, list):
        return set(declared)
    find = dict(declared["find"])
    finder = find_namespace_packages if find.pop("namespaces", True) else find_packages
    return set(finder(where=str(REPO), **find))


def test_the_wheel_holds_every_package():
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "pipelines").rglob("*.py")
                if "__pycache__" not in p.parts}  # every folder of modules
    assert {"pipelines", "pipelines.data", "pipelines.train"} <= packages
    assert _packaged() >= packages


def test_version_is_the_package_metadatas_and_fast(tmp_path):
    import subprocess
    import sys
    import time
    from importlib.metadata import version

    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "--version"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"ens {version('ens')}", out.stdout + out.stderr
    assert time.perf_counter() - start < 20  # no torch, no project needed


def test_the_declared_python_is_one_the_code_runs_on():
    """The code needs Python 3.11 (hashlib.file_digest, tomllib, `python -P` for the notebook's check run): the
    package may not claim an older one, and the README says the same."""
    from packaging.specifiers import SpecifierSet

    declared = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    assert "3.10" not in declared and "3.11" in declared
    assert "Python ≥ 3.11" in (REPO / "README.md").read_text()
