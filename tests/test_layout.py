"""The architecture, checked: imports point one way (optim <- stacked_adam, per_model, data,
models <- training <- stacked <- tracking <- records <- experiment <- sweep, report; report
never imports sweep), and
the optimizer's import loads torch but none of the pipeline's dependencies, so the optimizer
drops into any PyTorch project."""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from gradalign.hydra_compat import VERSION_BASE

PACKAGE = REPO_ROOT / "src" / "gradalign"
# Rank of each top-level module or subpackage: a module imports only modules of lower rank (and
# its own subpackage). Leaves first; sweep and report, at the top, never import each other.
RANKS = {
    "optim": 0,
    "checks": 0,
    "hydra_compat": 0,
    "schema": 0,
    "processes": 0,
    "credentials": 0,
    "config": 1,
    "budget": 1,
    "databases": 1,
    "data": 1,
    "models": 1,
    "per_model": 1,
    "stacked_adam": 1,
    "training": 2,
    "components": 2,
    "optuna_storage": 2,
    "progress": 3,
    "stacked": 3,
    "tracking": 3,
    "records": 4,
    "experiment": 5,
    "sweep": 6,
    "report": 6,
    "doctor": 7,
    "ui": 6,
    "stores": 4,
}
PIPELINE_DEPENDENCIES = ("mlflow", "hydra", "optuna", "omegaconf", "scipy", "matplotlib", "mnist1d")


def unit(path):
    """The top-level module or subpackage of gradalign that a source file belongs to."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def gradalign_imports(path):
    """The gradalign units a source file imports (at any depth of its code)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "gradalign" and len(parts) > 1 and parts[1] in RANKS:
                found.add(parts[1])
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.stem != "__init__")


def test_every_unit_has_a_rank():
    assert {unit(p) for p in SOURCES} == set(RANKS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_one_way(path):
    own = unit(path)
    for imported in gradalign_imports(path) - {own}:
        assert RANKS[imported] < RANKS[own], f"{own} must not import {imported}"


def _loaded_after(code):
    """The top-level modules loaded in a fresh interpreter after running ``code``."""
    probe = f"import sys; {code}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    return set(result.stdout.split())


def test_importing_the_library_loads_torch_and_none_of_the_pipeline():
    loaded = _loaded_after("from gradalign import GradientAlignmentOptimizer")
    assert "torch" in loaded
    assert not loaded & set(PIPELINE_DEPENDENCIES)


def test_the_package_and_its_config_module_load_neither_torch_nor_mlflow():
    """What train.py imports before it parses its arguments: --help and a bad config value
    answer without torch's or MLflow's import (seconds each)."""
    assert not _loaded_after("import gradalign") & {"torch", *PIPELINE_DEPENDENCIES}
    assert not _loaded_after("import gradalign.config") & {"torch", "mlflow", "optuna"}


HYDRA_APP = f"""
import hydra

@hydra.main(config_path=None, **{VERSION_BASE!r})
def main(cfg):
    print("ran")

main()
"""


def test_the_plugin_shims_are_silent_in_any_hydra_app_when_the_study_is_not_installed(tmp_path):
    """gradalign's Hydra plugins are installed with the optimizer: a Hydra app of the user's own,
    in an environment without the study's hydra-optuna-sweeper, must not hear of them. The
    environment: Hydra, its dependencies and gradalign alone on the path (no site-packages, so
    neither the sweeper's modules nor its entry points, which Hydra 1.4 loads too)."""
    site = tmp_path / "site"
    site.mkdir()
    for name in ("hydra", "omegaconf", "yaml", "antlr4", "packaging"):  # antlr4: Hydra 1.3's
        spec = importlib.util.find_spec(name)
        if spec is not None:
            (site / name).symlink_to(Path(spec.origin).parent)
    (site / "gradalign").symlink_to(PACKAGE)
    (site / "hydra_plugins").symlink_to(REPO_ROOT / "src" / "hydra_plugins")
    (tmp_path / "app.py").write_text(HYDRA_APP)
    result = subprocess.run(
        [sys.executable, "-S", "app.py", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ran"
    assert "gradalign" not in result.stderr and "Error importing" not in result.stderr
