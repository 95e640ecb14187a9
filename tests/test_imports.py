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


@pytest.mark.parametrize("dims", [2, 3])
def test_every_command_lists_a_folder_of_images_by_one_rule(tmp_path, dims):
    """train-many, paired, conditional and evaluate --samples see the same images in a folder: files with an image
    suffix, hidden entries and other files skipped, sub-folders only as 3D DICOM series where a command reads them."""
    import numpy as np
    import SimpleITK as sitk

    from consingan.cohort import find_images
    from consingan.conditional.data import list_labelled
    from consingan.io import list_images
    from consingan.paired.data import image_files

    data = tmp_path / "data"
    folder = data / "cells"
    (folder / "series").mkdir(parents=True)
    (data / "other").mkdir()
    shape = (8, 8) if dims == 2 else (4, 8, 8)
    for name in ("b.nii.gz", "a.mha", ".hidden.mha"):
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.uint8)), str(folder / name))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.uint8)), str(data / "other" / name))
    (folder / "notes.txt").write_text("not an image")
    if dims == 2:  # every reader's suffix counts, for every command (paired once skipped JPEG and DICOM files)
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros(shape, np.uint8)), str(folder / "c.jpg"))
    files = [folder / "a.mha", folder / "b.nii.gz"] + ([folder / "c.jpg"] if dims == 2 else [])
    series = [folder / "series"] if dims == 3 else []
    assert list_images(folder, dims) == sorted(files + series)
    assert find_images(str(folder), dims) == sorted(files + series)
    assert sorted(p for p, name in list_labelled(data, dims) if name == "cells") == sorted(files + series)
    assert list(image_files(folder, "--source").values()) == files  # paired pairs files only
    assert list_images(folder, dims, series_folders=False) == files  # evaluate --samples reads files only
