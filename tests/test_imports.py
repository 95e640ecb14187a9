"""What importing a module loads: sampling and prediction (and every data-loader worker) load no training code."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

TRAINERS = ("consingan.singan.trainer", "consingan.paired.trainer", "consingan.conditional.trainer")
LAZY_PACKAGES = ("consingan.io", "consingan.nn", "consingan.paired", "consingan.singan")


def modules_loaded_by(statement: str) -> set[str]:
    """The consingan modules in ``sys.modules`` after ``statement`` runs in a fresh interpreter."""
    listing = "print(json.dumps(sorted(m for m in sys.modules if m.startswith('consingan'))))"
    code = f"{statement}\nimport json, sys\n{listing}"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", [
    "import consingan.singan.sampler",
    "from consingan.singan.sampler import AugmentationDataset",
    "import consingan.paired.predict",
])
def test_sampling_and_prediction_load_no_trainer(statement):
    loaded = modules_loaded_by(statement)
    assert statement.split()[1] in loaded  # the module itself was imported
    assert not loaded & set(TRAINERS), sorted(loaded & set(TRAINERS))


def test_the_trainer_is_still_reachable_from_its_package():
    """The check above can fail: the package's public names load their modules when used."""
    assert "consingan.singan.trainer" in modules_loaded_by("from consingan.singan import train")


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_lazy_packages_keep_every_public_name(package):
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
        assert name in dir(module)
    namespace: dict = {}
    exec(f"from {package} import *", namespace)
    assert set(module.__all__) <= namespace.keys()
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        module.not_a_name  # noqa: B018


FAMILIES = ("singan", "paired", "conditional")
PACKAGE = Path(__file__).resolve().parent.parent / "consingan"
# Modules that use the families by design: the command line, the cohort runner, exports and run evaluation.
CONSUMERS = {"cli.py", "cohort.py", "ui.py", "io/export.py", "metrics/evaluate.py"}


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from x import y`` counts as x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def family_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "consingan" and parts[1] in FAMILIES else None


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_arrow_between_families(path):
    """A family imports only itself and the shared rooms; a shared room imports no family (the consumers aside)."""
    relative = str(path.relative_to(PACKAGE))
    if relative in CONSUMERS:
        return
    own = relative.split("/")[0] if relative.split("/")[0] in FAMILIES else None
    foreign = sorted(m for m in imported_modules(path) if family_of(m) not in (None, own))
    assert not foreign, f"{relative} imports {foreign}"


def test_the_arrow_check_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "module.py"
    source.write_text("def f():\n    from consingan.paired.trainer import PairedTrainer\n")
    assert family_of(sorted(imported_modules(source))[0]) == "paired"
