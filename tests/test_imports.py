"""What importing a module loads: sampling and prediction (and every data-loader worker) load no training code."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

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
