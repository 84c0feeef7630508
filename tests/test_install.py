"""A wheel install works with no source tree: presets and the demo config ship as package data.

The wheel is built offline from a copy of the project (pyproject, README, src) and installed into a fresh
virtual environment that borrows this environment's libraries (torch & co.) through a `.pth` line. A path
named in a `.pth` file is appended to sys.path, but the `.pth` files inside it are not run, so this
checkout's editable-install finder cannot leak `src/loraft` in; the test checks that `loraft.__file__` is the
installed copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from loraft.presets import preset_names

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project's wheel, built without network from a clean copy (no stale build/ folder)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(work / "dist"), str(source)], check=True, cwd=work)
    (built,) = (work / "dist").glob("loraft-*.whl")
    return built


def test_the_wheel_ships_every_preset(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in preset_names():
        assert f"loraft/configs/{preset}.yaml" in names
    assert "loraft/static/chat.html" in names
    # loraft ui's page: every file of src/loraft/ui/static (catalogs and the vendored chart library included)
    from loraft.ui.app import STATIC_DIR

    page_files = {f"loraft/ui/static/{path.relative_to(STATIC_DIR).as_posix()}" for path in STATIC_DIR.rglob("*")
                  if path.is_file()}
    assert {"loraft/ui/static/index.html", "loraft/ui/static/i18n/zh-CN.json",
            "loraft/ui/static/vendor/uPlot.iife.min.js"} <= page_files <= names
    from loraft.demo import PREBUILT_DIR

    shipped_base = sorted(f"loraft/demo/prebuilt/{item.name}" for item in PREBUILT_DIR.iterdir())
    assert "loraft/demo/prebuilt/model.safetensors" in shipped_base
    assert set(shipped_base) <= names


def test_a_preset_trains_from_a_wheel_install(wheel, tiny_bloom_dir, alpaca_jsonl, tmp_path):
    env_dir = tmp_path / "fresh-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    site_packages = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile",
                    "--target", str(site_packages), str(wheel)], check=True)
    borrowed = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site_packages / "borrowed_libraries.pth").write_text("".join(f"{path}\n" for path in borrowed), encoding="utf-8")

    workdir = tmp_path / "elsewhere"  # no configs/ here, and not inside the checkout
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    where = subprocess.run([str(python), "-c", "import loraft; print(loraft.__file__)"], cwd=workdir, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).parent == site_packages / "loraft", where

    run_dir = tmp_path / "run"
    result = subprocess.run(
        [str(python), "-m", "loraft.cli", "train", "demo", f"model.name_or_path={tiny_bloom_dir}",
         f"data.path={alpaca_jsonl}", f"output_dir={run_dir}", "train.max_steps=2", "train.precision=fp32",
         "train.per_device_train_batch_size=4", "train.logging_steps=1", "data.num_proc=1"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run directory: {run_dir}" in result.stdout
    assert read_run_status(run_dir) == "finished"
    assert (run_dir / "adapter_model.safetensors").is_file()


def read_run_status(run_dir: Path):
    from loraft.rundir import read_run_status

    return read_run_status(run_dir)
