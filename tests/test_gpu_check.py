"""`make gpu-check` without a GPU: the dry run of every step (CI runs it), and its test summary."""
import json
import re
import subprocess
import sys
from pathlib import Path

from bench import gpu_check
from bench.ops import OPS

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_runs_every_step_and_says_so(tmp_path):
    out = tmp_path / "gpu-check"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "== gpu-check: DRY RUN: --dry-run given" in proc.stdout
    assert "build ok" in proc.stdout and "DRY RUN done in" in proc.stdout
    for name in ("info.txt", "build.log", "gpu-tests.log", "gpu-tests.json", "gpu-tests.md", "bench.md"):
        assert (out / name).is_file(), name
    tests = json.loads((out / "gpu-tests.json").read_text())
    assert tests["exit_code"] == 0 and not tests["failed"]
    pytest_says = re.search(r"(\d+) skipped", (out / "gpu-tests.log").read_text().splitlines()[-1])
    assert pytest_says and tests["total"] == {"skipped": int(pytest_says.group(1))}, "every test counted once"
    assert set(tests["by_op_backend"]) >= {"attention", "layer_norm", "cross_entropy", "softmax", "gpu_paths"}
    for op in OPS:
        assert (out / "bench" / "cpu" / f"{op}.json").is_file(), op
    assert "| attention |" in (out / "bench.md").read_text()


def test_test_summary_by_op_and_backend():
    log = "\n".join([
        "tests/test_softmax.py::test_matches[cuda-triton-float32] PASSED                 [  1%]",
        "tests/test_softmax.py::test_matches[cuda-cuda-float32] FAILED                   [  2%]",
        "tests/test_softmax.py::test_matches[cuda-cuda-bfloat16] PASSED                  [  3%]",
        "tests/test_gpu_paths.py::test_cuda_float64[attention] SKIPPED (no GPU)          [  4%]",
        "tests/test_gpu_paths.py::test_softmax_long_rows[torch.float32-2049-triton] PASSED [  5%]",
        "tests/test_softmax.py::test_shapes[(1, 1)-cuda-torch] SKIPPED (no GPU)           [  6%]",
        "FAILED tests/test_softmax.py::test_matches[cuda-cuda-float32] - AssertionError",
    ])
    summary = gpu_check.summarize_tests(log)
    assert summary["by_op_backend"] == {"gpu_paths": {"other": {"skipped": 1}, "triton": {"passed": 1}},
                                        "softmax": {"triton": {"passed": 1}, "cuda": {"failed": 1, "passed": 1},
                                                    "torch": {"skipped": 1}}}
    assert summary["failed"] == ["tests/test_softmax.py::test_matches[cuda-cuda-float32]"]
    assert summary["total"] == {"passed": 3, "failed": 1, "skipped": 2}


def test_every_op_has_gpu_cases_with_its_parameters():
    """The real mode's cases (run only on a GPU) name exactly each op's parameters, in both dtypes."""
    assert set(gpu_check.GPU_CASES) == set(OPS)
    for op, cases in gpu_check.GPU_CASES.items():
        for case in cases:
            assert set(case) | {"dtype"} == set(OPS[op].params), op
            for dtype in gpu_check.DTYPES:
                OPS[op].make_inputs({**case, "dtype": dtype}, "meta")  # shapes and dtypes build
