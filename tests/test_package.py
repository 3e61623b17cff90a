"""The package a user installs: a wheel in a clean virtualenv, outside the checkout.

The virtualenv borrows the already installed dependencies (torch and the rest) through a ``.pth`` line, but
not this checkout: ``sam_reuse`` comes from the wheel alone, and nothing generic (``exporter``, ...) is
importable. In it, ``run`` works without ``--data`` on the bundled images, and the import layers hold.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A clean virtualenv with the wheel built from this checkout; returns its python."""
    root = tmp_path_factory.mktemp("package")
    had_build = (REPO / "build").exists()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(root / "dist"), str(REPO)], check=True, capture_output=True, cwd=root)
    if not had_build:  # setuptools builds in the source tree; leave the checkout as it was
        shutil.rmtree(REPO / "build", ignore_errors=True)
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((root / "dist").glob("sam_reuse-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
                   check=True, capture_output=True, cwd=root)
    return python


def _run(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, cwd=cwd, timeout=900)


def test_the_wheel_holds_one_namespace_and_the_bundled_data(installed, tmp_path):
    found = _run(installed, "-c", "import sam_reuse, sam_reuse.samples as s; print(sam_reuse.__file__); "
                 "print(len(list(s.BUNDLED_DATA.glob('*.jpg'))))", cwd=tmp_path)
    location, images = found.stdout.split()
    assert str(REPO) not in location and int(images) == 100
    for generic in ("exporter", "graphops", "calibrate", "finetune"):
        result = _run(installed, "-c", f"import {generic}", cwd=tmp_path)
        assert result.returncode != 0 and f"No module named '{generic}'" in result.stderr


def test_run_without_data_tunes_on_the_bundled_images(installed, tmp_path):
    out = tmp_path / "out"
    result = _run(installed, "-m", "sam_reuse.cli", "run", "--model-type", "test_vit_t", "--out", str(out),
                  "--search-images", "2", "--holdout-images", "2", "--targets", "0-2", "--sources", "3-4",
                  "--top-pairs", "2", "--evidence", "given", "--strategy", "fast", "--engines", "none", "--no-progress",
                  "--verify-images", "1", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode in (0, 3), result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["data"]["source"].endswith("sam_reuse/samples/data/isic2016")
    assert report["shipping"]["exit_status"] == result.returncode


def test_imports_run_one_way(installed, tmp_path):
    """import-linter's contracts (pyproject.toml) on the installed package, where every layer is one folder."""
    result = _run(installed, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                  f"sys.argv = ['lint-imports', '--config', {str(REPO / 'pyproject.toml')!r}]; "
                  "sys.exit(lint_imports_command())", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_imports_run_one_way_in_this_checkout(tmp_path):
    """The same contracts where developers work: an editable install maps sam_reuse.calibrate and the others to
    top-level folders, which import-linter cannot follow, so it reads a view of links laid out as the wheel is."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    view = tmp_path / "view" / "sam_reuse"
    view.mkdir(parents=True)
    for entry in (REPO / "sam_reuse").iterdir():
        (view / entry.name).symlink_to(entry)
    for package, folder in setuptools["package-dir"].items():
        (view / package.removeprefix("sam_reuse.")).symlink_to(REPO / folder)
    result = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                             f"sys.argv = ['lint-imports', '--config', {str(REPO / 'pyproject.toml')!r}]; "
                             "sys.exit(lint_imports_command())"], capture_output=True, text=True, cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(view.parent)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Contracts: 2 kept, 0 broken." in result.stdout
