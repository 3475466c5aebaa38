"""How fasttx installs: kernels/ and csrc/ ship under fasttx/ and never shadow a top-level package,
`pip install .` works with build isolation, and the extension always matches its torch or says why not."""
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import fasttx
from fasttx import extension

ROOT = Path(__file__).resolve().parents[1]
SHOW_PATHS = ("import fasttx, fasttx.kernels; print(fasttx.__file__); "
              "print(*[p for p in fasttx.kernels.__path__ if 'kernels' in p])")
SOURCE_FILES = ("pyproject.toml", "setup.py", "README.md", "csrc", "fasttx", "kernels")


def _import_paths(cwd, env=None):
    out = subprocess.run([sys.executable, "-c", SHOW_PATHS], cwd=cwd, env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return [Path(p).resolve() for p in out]


def _copy_sources(dest):
    """The files a build reads, copied, so that a build never races the repository's in-place one."""
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info")
    dest.mkdir()
    for name in SOURCE_FILES:
        path = ROOT / name
        (shutil.copytree if path.is_dir() else shutil.copy)(path, dest / name, **({"ignore": ignore} if path.is_dir() else {}))
    return dest


def _check_shipped(site):
    assert not (site / "kernels").exists(), "kernels/ must install under fasttx/, not as a top-level package"
    assert not (site / "csrc").exists(), "csrc/ must install under fasttx/, not as a top-level folder"
    wanted = [p.relative_to(ROOT).as_posix() for p in (ROOT / "kernels").glob("*.py")]
    wanted += [p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*") if p.is_file()]
    missing = [w for w in wanted if not (site / "fasttx" / w).is_file()]
    assert not missing, f"files left out of the wheel: {missing}"
    packages = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "fasttx").rglob("__init__.py"))
    missing = [p for p in packages if not (site / p / "__init__.py").is_file()]
    assert not missing, f"packages left out of a regular install: {missing}"


def test_editable_install_maps_kernels_to_the_source_tree(tmp_path):
    fasttx_init, kernels_dir = _import_paths(cwd=tmp_path)  # not the repo, so no cwd import
    assert fasttx_init == ROOT / "fasttx" / "__init__.py"
    assert kernels_dir == ROOT / "kernels"


def test_the_repository_root_hides_no_installed_kernels_package():
    """Hugging Face's `kernels` (a dependency of transformers) wins over our kernels/ folder, from the root too.

    Our kernels/ has no __init__.py, so from the root it is at most a namespace portion, and a regular
    package anywhere on sys.path beats that. setuptools loads `kernels._internals` for an egg_info
    entry point on every build, which is how a shadowing folder once broke every install.
    """
    if importlib.util.find_spec("kernels") is None or not importlib.util.find_spec("kernels").origin:
        pytest.skip("Hugging Face's kernels package is not installed here (requirements-dev.lock installs it)")
    script = ("import kernels, fasttx.kernels, importlib.metadata as md; print(kernels.__file__); "
              "print(*[p for p in fasttx.kernels.__path__ if 'kernels' in p]); "
              "[ep.load() for ep in md.entry_points(group='egg_info.writers')]")
    for argv in ([sys.executable, "-c", script], [sys.executable, "-m", "pytest", "--version"]):
        out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
    hf_init, ours = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.split()
    assert Path(hf_init).resolve().parent != ROOT / "kernels"
    assert "site-packages" in hf_init
    assert Path(ours).resolve() == ROOT / "kernels"
    import kernels  # this pytest process runs from the root too (`python -m pytest` puts it on sys.path)
    assert Path(kernels.__file__).resolve().parent != ROOT / "kernels"


def test_regular_install_ships_every_kernel_and_source(tmp_path):
    src = _copy_sources(tmp_path / "src")
    site = tmp_path / "site"
    # The default build: pure Python, the extension is compiled on first use.
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
                            "--target", str(site), str(src)], capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if k != "FASTTX_BUILD_EXTENSION"})
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    _check_shipped(site)
    assert not list((site / "fasttx").glob("_C*.so"))
    # python -S: no site-packages processing, so the editable install's finder (a .pth hook) cannot
    # serve anything the regular install left out; torch comes from PYTHONPATH.
    torch_site = Path(torch.__file__).resolve().parents[1]
    script = ("import fasttx, fasttx.kernels.attention, fasttx._build as b, torch; print(fasttx.__file__); "
              "print(b.csrc_dir()); y = fasttx.bias_gelu(torch.ones(2, 3), torch.zeros(3)); "
              "print(fasttx.backends.machine_reasons()['cpu']); print(round(y[0, 0].item(), 4))")
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{torch_site}", FASTTX_BUILD_EXTENSION="0"))
    assert out.returncode == 0, out.stderr[-3000:]
    fasttx_init, csrc, reason, value = out.stdout.strip().split("\n")
    assert Path(fasttx_init).resolve() == site / "fasttx" / "__init__.py"
    assert Path(csrc).resolve() == site / "fasttx" / "csrc"
    assert "fasttx._C was not built, and FASTTX_BUILD_EXTENSION=0 forbids building it" in reason
    assert value == "0.8413"  # gelu(1), served by the torch backend


def _torch_closure():
    """torch and every distribution it needs here, by name."""
    from packaging.requirements import Requirement

    seen, todo = set(), ["torch"]
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        for text in importlib.metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _venv_with_only_torch(root):
    """A fresh venv that sees this environment's torch and what torch needs, and nothing else:
    symlinks to those distributions' files, put on its path by a .pth file."""
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    farm = root / "torch-only"
    farm.mkdir()
    wanted = _torch_closure()
    for dist in importlib.metadata.distributions():
        if re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower() not in wanted:
            continue
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            target = Path(dist.locate_file(top))
            if target.exists() and not (farm / top).exists():
                (farm / top).symlink_to(target)
    purelib = subprocess.run([str(root / "venv" / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "torch-only.pth").write_text(str(farm) + "\n")
    return root / "venv" / "bin" / "python"


def test_pip_install_with_build_isolation_in_a_venv_with_only_torch(tmp_path):
    """What a user types: `pip install .`, build isolation on (pip's default), torch already installed."""
    python = _venv_with_only_torch(tmp_path)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True,
                            check=True).stdout
    assert re.search(r"^torch==", listed, re.M) and not re.search(r"^(numpy|ninja|transformers)==", listed, re.M)
    src = _copy_sources(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTTX_", "PYTHON"))}
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(src)], capture_output=True, text=True, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True, env=env)
    assert check.returncode == 0, check.stdout
    script = ("import fasttx, torch; print(fasttx.__file__); "
              "print(fasttx.layer_norm(torch.ones(2, 4), (4,)).abs().sum().item())")
    out = subprocess.run([str(python), "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(env, FASTTX_BUILD_EXTENSION="0"))
    assert out.returncode == 0, out.stderr[-3000:]
    where, total = out.stdout.split()
    assert Path(where).resolve().is_relative_to(tmp_path / "venv") and float(total) == 0.0


def test_the_torch_floor_is_stated_once():
    pyproject = (ROOT / "pyproject.toml").read_text()
    floor = re.search(r'"torch>=(\d+)\.(\d+)"', pyproject)
    assert floor, "pyproject.toml must state the torch floor as torch>=X.Y"
    assert tuple(map(int, floor.groups())) == fasttx.TORCH_FLOOR
    assert f"FLOOR_TORCH := {floor.group(1)}.{floor.group(2)}." in (ROOT / "Makefile").read_text()
    assert f"torch >= {floor.group(1)}.{floor.group(2)}" in (ROOT / "README.md").read_text()


def test_an_older_torch_gets_a_one_line_error():
    script = "import torch; torch.__version__ = '2.8.0+cu128'; import fasttx"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last == "ImportError: fasttx needs torch >= 2.9, but torch 2.8.0+cu128 is installed"


def _run_with_fake_extension(setup, env_extra):
    script = setup + (
        "import warnings, torch, fasttx\n"
        "from fasttx.info import report\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    x, b = torch.randn(3, 8), torch.randn(8)\n"
        "    torch.testing.assert_close(fasttx.bias_gelu(x, b), torch.nn.functional.gelu(x + b))\n"
        "    fasttx.bias_gelu(x, b)\n"
        "print('WARNINGS', len([w for w in caught if issubclass(w.category, fasttx.extension.ExtensionWarning)]))\n"
        "for w in caught: print('WARNING', w.message)\n"
        "try:\n"
        "    with fasttx.use_backend('cpu'):\n"
        "        fasttx.bias_gelu(x, b)\n"
        "    raise SystemExit('forced cpu backend should have raised')\n"
        "except fasttx.BackendUnavailableError as e:\n"
        "    print('FORCED', e)\n"
        "print(report())\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ, **env_extra))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_an_extension_built_for_another_torch_is_refused_with_a_warning():
    fake = ("import sys, types; m = types.ModuleType('fasttx._C'); m.torch_version = '2.0.0'; "
            "m.built_with_cuda = False; sys.modules['fasttx._C'] = m\n")
    out = _run_with_fake_extension(fake, {"FASTTX_BUILD_EXTENSION": "0"})
    expected = f"the installed fasttx._C was built for torch 2.0.0, this is torch {extension.torch_release()}"
    assert "WARNINGS 1\n" in out  # once, not per call
    assert expected in out.split("FORCED")[0] and "pip install" in out.split("FORCED")[0]
    assert expected in out.split("FORCED")[1].split("\n")[0]
    assert f"cpu     unavailable: {expected}" in out


def test_a_failed_just_in_time_build_is_a_warning_not_a_silent_fallback(tmp_path):
    # No installed extension, and a compiler that always fails.
    out = _run_with_fake_extension("import sys; sys.modules['fasttx._C'] = None\n",
                                   {"FASTTX_CACHE_DIR": str(tmp_path), "CXX": "/bin/false", "MAX_JOBS": "1"})
    assert "WARNINGS 1\n" in out
    assert "building it for this torch failed" in out.split("FORCED")[0]
    assert "building it for this torch failed" in out.split("FORCED")[1].split("\n")[0]
    assert "fasttx._C: missing" in out
    assert not list(tmp_path.rglob("built"))


def test_choosing_no_extension_is_quiet():
    out = _run_with_fake_extension("import sys; sys.modules['fasttx._C'] = None\n", {"FASTTX_BUILD_EXTENSION": "0"})
    assert "WARNINGS 0\n" in out
    assert "cpu     unavailable: fasttx._C was not built, and FASTTX_BUILD_EXTENSION=0 forbids" in out


def test_the_extension_in_use_matches_this_torch():
    module = fasttx.backends.extension()
    if module is None:
        pytest.fail(f"fasttx._C is unavailable: {fasttx.backends.extension_error()}")
    assert module.torch_version == extension.torch_release()
    assert sys.modules["fasttx._C"] is module


def test_the_just_in_time_build_compiles_every_source_once_per_torch(tmp_path, monkeypatch, capsys):
    """What build_just_in_time asks of cpp_extension.load (the compile itself runs in the torch 2.11 and floor checks)."""
    from torch.utils import cpp_extension

    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        (Path(kwargs["build_directory"]) / "fasttx_C.so").write_bytes(b"")
        return "module"

    monkeypatch.setenv("FASTTX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(extension, "_jit_cuda_plan", lambda: (None, "no CUDA device is available"))
    assert extension.build_just_in_time() == "module"
    (call,) = calls
    csrc = ROOT / "csrc"
    assert sorted(call["sources"]) == sorted(str(p) for p in list((csrc / "cpu").glob("*.cpp")) + [csrc / "bindings.cpp"])
    assert call["with_cuda"] is False and call["extra_cflags"] == ["-O3", "-fopenmp"] and str(csrc) in call["extra_include_paths"]
    build_dir = Path(call["build_directory"])
    assert build_dir.parent == tmp_path and build_dir.name.startswith(f"torch-{torch.__version__}-")
    assert (build_dir / "built").read_text().strip() == torch.__version__
    assert "compiling its C++ (CPU only: no CUDA device is available) extension" in capsys.readouterr().err
    # The next process finds the marker and imports the cached build without compiling.
    monkeypatch.setattr(extension, "_import_built", lambda so: f"imported {so.name}")
    assert extension.build_just_in_time() == "imported fasttx_C.so" and len(calls) == 1
