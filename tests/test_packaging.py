"""kernels/ installs as fasttx.kernels in an editable install and in a regular one alike."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHOW_PATHS = "import fasttx, fasttx.kernels, fasttx._C; print(fasttx.__file__); print(fasttx.kernels.__file__)"


def _import_paths(cwd, env=None):
    out = subprocess.run([sys.executable, "-c", SHOW_PATHS], cwd=cwd, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return [Path(p).resolve() for p in out]


def test_editable_install_maps_kernels_to_the_source_tree(tmp_path):
    fasttx_init, kernels_init = _import_paths(cwd=tmp_path)  # not the repo, so no cwd import
    assert fasttx_init == ROOT / "fasttx" / "__init__.py"
    assert kernels_init == ROOT / "kernels" / "__init__.py"


def test_regular_install_ships_kernels_as_fasttx_kernels(tmp_path):
    # Build from a copy so that this never races an in-place build of the repo.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info")
    src.mkdir()
    for name in ("setup.py", "README.md", "csrc", "fasttx", "kernels"):
        path = ROOT / name
        (shutil.copytree if path.is_dir() else shutil.copy)(path, src / name, **({"ignore": ignore} if path.is_dir() else {}))
    site = tmp_path / "site"
    # The layout is what this test is about: no extension (FASTTX_BUILD_EXTENSION=0), which also
    # shows that fasttx works without one. The editable build compiles it (make build), and
    # test_cuda_build checks the CUDA link; compiling it here again took 6 of CI's 25 minutes.
    env = dict(os.environ, FASTTX_BUILD_EXTENSION="0")
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                            "--target", str(site), str(src)], env=env, capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    assert not (site / "kernels").exists(), "kernels/ must install under fasttx/, not as a top-level package"
    assert not list((site / "fasttx").glob("_C*.so"))
    # python -S: no site-packages processing, so the editable install's finder (a .pth hook) cannot
    # serve anything the regular install left out; torch comes from PYTHONPATH.
    torch_site = Path(torch.__file__).resolve().parents[1]
    script = ("import fasttx, fasttx.kernels, torch; print(fasttx.__file__); print(fasttx.kernels.__file__); "
              "y = fasttx.bias_gelu(torch.ones(2, 3), torch.zeros(3)); "
              "assert fasttx.backends.machine_reasons()['cpu'] is not None; print(round(y[0, 0].item(), 4))")
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{torch_site}"))
    assert out.returncode == 0, out.stderr[-3000:]
    fasttx_init, kernels_init, value = out.stdout.split()
    assert Path(fasttx_init).resolve() == site / "fasttx" / "__init__.py"
    assert Path(kernels_init).resolve() == site / "fasttx" / "kernels" / "__init__.py"
    assert value == "0.8413"  # gelu(1), served by the torch backend
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "fasttx").rglob("__init__.py"))
    missing = [p for p in packages if not (site / p / "__init__.py").is_file()]
    assert not missing, f"packages left out of a regular install: {missing}"
