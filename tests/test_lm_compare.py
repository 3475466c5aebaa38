"""python -m fasttx compare: eager vs fused training, side by side."""
import argparse
import copy
import json

import pytest
import torch

from fasttx.lm import compare

MB = 1 << 20
TINY = dict(n_layer=1, d_model=32, n_head=2, block_size=16, batch_size=2, steps=4, warmup_steps=1, dtype="fp32")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    text = folder / "text.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    return {"data": [str(text)], "cache_dir": folder / "cache"}


@pytest.fixture(scope="module")
def result(corpus, tmp_path_factory):
    return compare.compare(**TINY, **corpus, out=tmp_path_factory.mktemp("out"), device="cpu", progress=False)


def test_writes_png_and_json(result):
    with open(result["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(open(result["json"]).read())
    assert set(saved["providers"]) == {"eager", "fused"}
    for provider in saved["providers"].values():
        assert len(provider["step_times_s"]) == TINY["steps"] and min(provider["step_times_s"]) > 0
        assert len(provider["losses"]) == TINY["steps"]
        assert provider["tokens_per_s"] > 0
        assert provider["peak_bytes"] > provider["static_bytes"] > 0
        assert provider["peak_bytes"] == provider["static_bytes"] + provider["step_peak_bytes"]
    assert set(saved["criteria"]) == {"speed", "memory", "loss"}
    assert saved["machine"]["allocator"] in ("glibc", "tcmalloc")


def test_losses_agree_in_fp32(result):
    eager, fused = result["providers"]["eager"]["losses"], result["providers"]["fused"]["losses"]
    for step, (e, f) in enumerate(zip(eager, fused)):
        assert abs(f - e) / e < 1e-4, (step, e, f)
    assert result["criteria"]["loss"]["pass"]


def test_static_bytes_are_parameters_optimizer_state_and_batch(result):
    config = compare.GPTConfig(**{**result["config"], "kernels": "eager"})
    n_params = compare.GPT(config).num_parameters()  # the tied weight once
    batch = 2 * TINY["batch_size"] * TINY["block_size"] * 8  # x and y, int64
    steps = 2 * config.n_layer * 6 + 4  # one 4-byte step counter per parameter tensor
    expected = 3 * 4 * n_params + batch + 4 * steps  # weights, exp_avg, exp_avg_sq in fp32
    assert result["providers"]["eager"]["static_bytes"] == pytest.approx(expected, rel=0.01)


def test_step_peak_bytes_on_a_known_pattern():
    def pattern():
        a = torch.empty(100 * MB, dtype=torch.uint8).fill_(1)
        del a
        b = torch.empty(50 * MB, dtype=torch.uint8).fill_(1)
        del b
    peak = compare.step_peak_bytes(pattern, "cpu")
    assert 100 * MB <= peak <= 1.03 * 100 * MB


def test_step_peak_bytes_counts_temporaries_inside_ops():
    # cross_entropy allocates log_softmax's (n, classes) output and frees it inside one op call
    logits, targets = torch.randn(4096, 1024), torch.zeros(4096, dtype=torch.long)
    peak = compare.step_peak_bytes(lambda: torch.nn.functional.cross_entropy(logits, targets), "cpu")
    assert peak >= logits.numel() * 4


def test_deep_copy_keeps_the_optimizer_on_the_copied_parameters():
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups[0]["params"][0] is model2.weight
    assert model2.weight in opt2.state


@pytest.mark.parametrize("kwargs, name", [
    (dict(steps=0), "steps"), (dict(steps=-3), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(steps=3, warmup_steps=3), "warmup_steps"), (dict(dtype="fp16"), "dtype"), (dict(threads=0), "threads"),
    (dict(lr=0.0), "lr"),
])
def test_bad_arguments(kwargs, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        compare.compare(**{**TINY, **kwargs}, out=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())


def test_command_line_quick_and_overrides(corpus, tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    compare.add_arguments(parser)
    args = parser.parse_args(["--quick", "--steps", "3", "--n-layer", "1", "--block-size", "16",
                              "--warmup-steps", "1", "--out", str(tmp_path), "--device", "cpu", "--data", *corpus["data"]])
    monkeypatch.setattr(compare, "default_cache_dir", lambda: corpus["cache_dir"])
    assert compare.main(args) == 0
    printed = capsys.readouterr().out
    assert "| eager |" in printed and "| fused |" in printed
    assert printed.count("PASS") + printed.count("FAIL") == 3
    saved = json.loads((tmp_path / "compare_quick_fp32.json").read_text())
    assert saved["config"]["n_layer"] == 1 and saved["config"]["d_model"] == 128  # flag wins, quick fills the rest
    assert saved["settings"]["steps"] == 3 and saved["settings"]["batch_size"] == 4
