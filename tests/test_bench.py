"""Smoke test of the benchmark harness (bench/): a broken harness must fail CI.

One tiny bias_gelu case, 3 rounds, 1 thread, this process's allocator: checks
the files and fields are written, the numbers are positive, and the
saved-for-backward accounting is exact.
"""
import csv
import json

import pytest
import torch
import torch.nn.functional as F

import bench
from bench import harness
from bench.ops import OPS

M, N = 64, 128
EXPECTED_PROVIDERS = {"eager", "compile", "fasttx-torch"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    docs = bench.run(ops=["bias_gelu"], level="smoke", cases={"bias_gelu": [{"shape": (M, N), "dtype": "float32",
                                                                            "approximate": "tanh"}]},
                     threads=[1], reps=3, out_dir=str(out), echo=False, device="cpu")  # "auto" is CUDA on a GPU machine
    return out, docs["bias_gelu"]


def test_json_has_metadata_roofline_and_rows(smoke):
    out, _ = smoke
    doc = json.loads((out / "cpu" / "bias_gelu.json").read_text())
    assert doc["op"] == "bias_gelu" and doc["device"] == "cpu"
    for key in ("date", "torch", "triton", "fasttx", "cpu_model"):
        assert key in doc["meta"]
    (run,) = doc["runs"]
    assert run["threads"] == 1 and run["allocator"] in ("glibc", "tcmalloc")
    assert run["roofline"]["copy"]["gbps"] > 0 and run["roofline"]["gemm"]["gflops"] > 0
    providers = {r["provider"] for r in run["rows"]}
    assert EXPECTED_PROVIDERS <= providers and "fasttx-triton" not in providers
    assert {r["mode"] for r in run["rows"]} == {"fwd", "fwd+bwd"}


def test_rows_are_measured_and_positive(smoke):
    _, doc = smoke
    rows = [r for r in doc["runs"][0]["rows"] if r["provider"] in EXPECTED_PROVIDERS]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["reps"] == 3 and len(r["times_ms"]) == 3
        assert 0 < r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]
        assert r["gbps"] > 0 and r["pct_copy_bw"] > 0 and r["speedup"] > 0
        assert r["speedup_q20"] <= r["speedup"] <= r["speedup_q80"]
        assert r["peak_mem_bytes"] is None  # the CPU cannot tell; must not be faked
        elem = 4
        assert r["bytes"] == (2 if r["mode"] == "fwd" else 5) * M * N * elem


def test_saved_for_backward_is_exact_for_eager(smoke):
    _, doc = smoke
    eager = {r["mode"]: r for r in doc["runs"][0]["rows"] if r["provider"] == "eager"}
    assert eager["fwd+bwd"]["saved_bytes"] == M * N * 4  # F.gelu(x + b) keeps exactly x + b
    assert eager["fwd"]["saved_bytes"] == 0  # no grad, nothing saved


def test_saved_for_backward_counts_distinct_storages():
    x = torch.randn(32, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    _, saved = harness.saved_for_backward(lambda x, b: F.gelu(x + b), (x, b))
    assert saved == 32 * 16 * 4
    _, saved = harness.saved_for_backward(lambda x, b: x * x, (x, b))  # x saved twice, one storage
    assert saved == 32 * 16 * 4


def test_csv_matches_json(smoke):
    out, doc = smoke
    with open(out / "cpu" / "bias_gelu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["runs"][0]["rows"])
    for field in ("allocator", "threads", "shape", "dtype", "approximate", "mode", "provider", "median_ms",
                  "q20_ms", "q80_ms", "gbps", "pct_copy_bw", "speedup", "saved_bytes"):
        assert field in rows[0]
    assert rows[0]["shape"] == f"{M}x{N}"
    assert (out / "cpu" / "bias_gelu.png").exists()


def test_every_op_sweep_keeps_its_key_case():
    for spec in OPS.values():
        for level in ("full", "quick"):
            assert any(spec.is_key_case(c) for c in spec.sweep(level)), (spec.name, level)


def test_an_op_with_its_own_torch_provider_gets_paired_ratios_against_it(tmp_path):
    """attention's "sdpa" provider runs beside eager, and every row carries its ratio to it."""
    docs = bench.run(ops=["attention"], level="smoke", threads=[1], reps=3, out_dir=str(tmp_path), echo=False,
                     device="cpu", providers=["eager", "sdpa", "fasttx-torch"])
    rows = [r for r in docs["attention"]["runs"][0]["rows"] if r["status"] == "ok"]
    assert {r["provider"] for r in rows} == {"eager", "sdpa", "fasttx-torch"}
    for r in rows:
        assert r["vs_sdpa_q20"] <= r["vs_sdpa"] <= r["vs_sdpa_q80"]
        if r["provider"] == "sdpa":
            assert r["vs_sdpa"] == 1.0
    assert "vs_sdpa" in (tmp_path / "cpu" / "attention.csv").read_text()


def test_the_longest_llm_cases_run_once_where_the_issue_measures_them():
    """linear_cross_entropy's 8192-token cases run at 2 threads under glibc, not again at 1 thread or under
    tcmalloc (each round is 9-20 s a provider); the smaller cases run everywhere."""
    from bench.ops import OPS
    spec = OPS["linear_cross_entropy"]
    for case in spec.sweep("full") + spec.sweep("quick"):
        assert case["tokens"] == 8192
        assert spec.leave_out(case, 2, "glibc") is None
        assert "2 threads only" in spec.leave_out(case, 1, "glibc")
        assert "glibc only" in spec.leave_out(case, 2, "tcmalloc")
    for case in spec.sweep("smoke"):
        assert all(spec.leave_out(case, t, a) is None for t in (1, 2) for a in ("glibc", "tcmalloc"))


def test_each_op_is_written_as_its_runs_end_and_marked_complete_at_the_end(tmp_path, monkeypatch):
    """A stopped `make bench` leaves what it measured: every op's files are rewritten after each of its runs
    (meta.complete False), and the end of the run writes them complete."""
    from bench import report
    written = []
    real_write = report.write
    monkeypatch.setattr(report, "write", lambda doc, out: written.append(
        (doc["op"], len(doc["runs"]), doc["meta"]["complete"])) or real_write(doc, out))
    case = {"shape": (M, N), "dtype": "float32", "approximate": "tanh"}
    bench.run(ops=["bias_gelu", "layer_norm"], level="smoke",
              cases={"bias_gelu": [case], "layer_norm": [{"shape": (M, N), "dtype": "float32"}]},
              threads=[1, 2], reps=3, out_dir=str(tmp_path), echo=False, device="cpu")
    assert written[:4] == [("bias_gelu", 1, False), ("layer_norm", 1, False), ("bias_gelu", 2, False),
                           ("layer_norm", 2, False)]
    assert sorted(written[4:]) == [("bias_gelu", 2, True), ("layer_norm", 2, True)]
    assert json.loads((tmp_path / "cpu" / "layer_norm.json").read_text())["meta"]["complete"] is True
