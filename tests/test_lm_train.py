"""python -m fasttx train / generate: resume, DDP, Ctrl-C, checkpoints, safetensors, sampling, lr schedule.

Tiny models (2 layers, d_model 32, block 32, batch 4) on a ~24 KB generated corpus, one thread: fast.
"""
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasttx.__main__ import main as cli
from fasttx.lm import checkpoint as ckpt_io
from fasttx.lm.generate import generate_text, load_model
from fasttx.lm.train import TrainConfig, lr_at, make_optimizer, train
from fasttx.models.gpt import GPT

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, d_model=32, n_head=2, block_size=32, batch_size=4)
TINY_FLAGS = ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--block-size", "32", "--threads", "1",
              "--device", "cpu", "--eval-batches", "2", "--warmup", "5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog def return import class self if else for in".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(600)]
    (folder / "text.txt").write_text("\n".join(lines))
    return {"data": [str(folder / "text.txt")], "cache_dir": str(folder / "cache")}


def tiny(corpus, out, **overrides) -> TrainConfig:
    values = dict(out=str(out), **corpus, **TINY, steps=40, warmup=5, eval_every=0, eval_batches=2, ckpt_every=0,
                  threads=1, device="cpu", progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def model_state(ckpt_path):
    return ckpt_io.load_checkpoint(ckpt_path)["model"]


def step_losses(metrics_path):
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train(tiny(corpus, out, steps=30, save_safetensors=True, eval_every=10))
    return out


# ---- 1. resume is exact ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dropout, kernels, dtype", [(0.0, "fused", "fp32"), (0.1, "fused", "fp32"),
                                                    (0.1, "eager", "bf16")])
def test_resume_continues_exactly(corpus, tmp_path, dropout, kernels, dtype):
    # Same process, same thread count, same shapes: every kernel is deterministic, so equality is exact.
    # Dropout (fused: attention's Philox seed and F.dropout; eager: SDPA's) draws from the restored CPU RNG.
    run = dict(dropout=dropout, kernels=kernels, dtype=dtype, eval_every=10, ckpt_every=15)
    straight = train(tiny(corpus, tmp_path / "straight", **run))
    first = train(tiny(corpus, tmp_path / "split", **run, stop_at=20))
    assert first["step"] == 20 and not first["interrupted"]
    metrics = tmp_path / "split" / "metrics.jsonl"
    with open(metrics, "a") as f:  # as if the run had gone on past its last checkpoint before dying
        f.write(json.dumps({"step": 21, "loss": 123.0}) + "\n" + '{"step": 22, "lo')
    second = train(tiny(corpus, tmp_path / "split", **run, resume=True))
    assert second["start_step"] == 20 and second["step"] == 40
    assert first["losses"] + second["losses"] == straight["losses"]
    assert step_losses(metrics) == step_losses(tmp_path / "straight" / "metrics.jsonl")
    assert [s for s, _ in step_losses(metrics)] == list(range(1, 41))
    a = ckpt_io.load_checkpoint(tmp_path / "straight" / "ckpt.pt")
    b = ckpt_io.load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["optimizer"]["state"][i]["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
               for i in a["optimizer"]["state"])
    if dropout:
        no_dropout = train(tiny(corpus, tmp_path / "no_dropout", kernels=kernels, dtype=dtype))
        assert straight["losses"] != no_dropout["losses"]


def test_existing_checkpoint_needs_resume(trained, corpus):
    with pytest.raises(FileExistsError, match="ckpt.pt"):
        train(tiny(corpus, trained, steps=31))


# ---- 2. DDP == one process with the global batch -----------------------------------------------------------


# Same rows, different float summation order. Adam divides by sqrt(v), so entries whose gradient is ~0 (the key
# bias's exact gradient is 0: softmax ignores a shift) turn rounding noise into small update differences. Updates
# are ~lr = 1e-3 per step, so 1e-5 still catches a wrong batch or a missed all-reduce.
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_equal_one_rank_with_double_batch(corpus, tmp_path):
    steps = 6
    # Each rank: batch 2 with 2 accumulation micro-steps (the first under no_sync) = one rank of batch 4, x2.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "fasttx", "train", *TINY_FLAGS, "--batch-size", "2",
           "--grad-accum", "2", "--steps", str(steps), "--eval-every", "3", "--out", str(tmp_path / "ddp"),
           "--data", *corpus["data"], "--cache-dir", corpus["cache_dir"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    single = train(tiny(corpus, tmp_path / "single", batch_size=4, grad_accum=2, steps=steps, eval_every=3))
    ddp_losses = [loss for _, loss in step_losses(tmp_path / "ddp" / "metrics.jsonl")]
    assert ddp_losses == pytest.approx(single["losses"], rel=1e-5)
    ddp, one = model_state(tmp_path / "ddp" / "ckpt.pt"), model_state(tmp_path / "single" / "ckpt.pt")
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], **PARAM_TOL, msg=key)
    saved = ckpt_io.load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    assert saved["world_size"] == 2 and len(saved["rng"]["cpu"]) == 2


# ---- 7. gradient accumulation == a bigger batch ------------------------------------------------------------


def test_grad_accum_equals_bigger_batch(corpus, tmp_path):
    accum = train(tiny(corpus, tmp_path / "accum", batch_size=2, grad_accum=2, steps=10))
    big = train(tiny(corpus, tmp_path / "big", batch_size=4, grad_accum=1, steps=10))
    # The same rows (micro-batches are rank-like slices of one global batch); only float sums differ.
    assert accum["losses"] == pytest.approx(big["losses"], rel=1e-5)
    a, b = model_state(tmp_path / "accum" / "ckpt.pt"), model_state(tmp_path / "big" / "ckpt.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], **PARAM_TOL, msg=key)


# ---- 3. Ctrl-C ------------------------------------------------------------------------------------------


def test_sigint_checkpoints_and_resume_finishes(corpus, tmp_path):
    out, steps = tmp_path / "run", 600
    cmd = [sys.executable, "-m", "fasttx", "train", *TINY_FLAGS, "--batch-size", "4", "--steps", str(steps),
           "--eval-every", "0", "--ckpt-every", "0", "--out", str(out), "--data", *corpus["data"],
           "--cache-dir", corpus["cache_dir"]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and metrics.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr and "interrupted" in stdout and str(out / "ckpt.pt") in stdout
    saved = ckpt_io.load_checkpoint(out / "ckpt.pt")
    assert 3 <= saved["step"] < steps
    assert step_losses(out / "metrics.jsonl")[-1][0] == saved["step"]
    run = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert ckpt_io.load_checkpoint(out / "ckpt.pt")["step"] == steps
    assert [s for s, _ in step_losses(out / "metrics.jsonl")] == list(range(1, steps + 1))


# ---- 4. bad checkpoints ------------------------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_corrupt_and_foreign_checkpoints_are_refused(trained, tmp_path):
    good = (trained / "ckpt.pt").read_bytes()
    truncated, garbage = tmp_path / "truncated.pt", tmp_path / "garbage.pt"
    truncated.write_bytes(good[: len(good) // 2])
    garbage.write_bytes(os.urandom(4096))
    for path in (truncated, garbage, tmp_path / "missing.pt"):
        with pytest.raises(ckpt_io.CheckpointError, match=path.name):
            ckpt_io.load_checkpoint(path)
        with pytest.raises(ckpt_io.CheckpointError, match=path.name):
            load_model(path)

    marker, evil = tmp_path / "code-ran", tmp_path / "evil.pt"
    torch.save({"format": ckpt_io.FORMAT, "payload": RunsCode(marker)}, evil)
    with pytest.raises(ckpt_io.CheckpointError, match=r"evil\.pt.*refused"):
        ckpt_io.load_checkpoint(evil)
    assert not marker.exists()

    saved = torch.load(trained / "ckpt.pt", weights_only=True)
    for name, change, message in [("version.pt", {"version": 99}, "version 99"),
                                  ("format.pt", {"format": "other"}, "not a fasttx LM checkpoint"),
                                  ("keys.pt", {"optimizer": None}, r"missing keys \['optimizer'\]"),
                                  ("config.pt", {"model_config": {**saved["model_config"], "n_head": 5}}, "n_head")]:
        bad = {k: v for k, v in {**saved, **change}.items() if v is not None}
        torch.save({**bad, "sha256": ckpt_io.state_digest(bad)}, tmp_path / name)  # sealed: past the checksum
        with pytest.raises(ckpt_io.CheckpointError, match=f"{name}.*{message}"):
            ckpt_io.load_checkpoint(tmp_path / name)

    wrong_shape = {**saved, "model_config": {**saved["model_config"], "d_model": 64, "n_head": 2}}
    torch.save({**wrong_shape, "sha256": ckpt_io.state_digest(wrong_shape)}, tmp_path / "shape.pt")
    with pytest.raises(ckpt_io.CheckpointError, match=r"shape\.pt: its model config does not match its tensors: "
                                                      r"d_model 64 but the tensors give 32"):
        load_model(tmp_path / "shape.pt")


def test_resume_with_other_model_flags_is_refused(trained, corpus):
    with pytest.raises(ValueError, match=r"ckpt\.pt was written for a different model: n_layer: checkpoint 2, "
                                         r"requested 3"):
        train(tiny(corpus, trained, steps=31, n_layer=3, resume=True))
    assert cli(["train", "--out", str(trained), "--resume", "--d-model", "64", *TINY_FLAGS[6:]]) == 2


# ---- 5. safetensors ----------------------------------------------------------------------------------------


def test_safetensors_export(trained):
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(trained / "model.safetensors")
    state = model_state(trained / "ckpt.pt")
    assert set(tensors) == set(state) - {"lm_head.weight"}  # tied to tok_emb.weight: stored once
    assert all(torch.equal(tensors[k], state[k]) for k in tensors)
    with safe_open(str(trained / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["model_config"]) == ckpt_io.load_checkpoint(trained / "ckpt.pt")["model_config"]
    assert meta["step"] == "30"
    model = load_model(trained / "model.safetensors")
    assert model.lm_head.weight is model.tok_emb.weight and torch.equal(model.lm_head.weight, state["tok_emb.weight"])


# ---- 6. generate -----------------------------------------------------------------------------------------


def test_generate_cache_matches_no_cache(trained):
    model = load_model(trained / "ckpt.pt")
    # 70 new bytes run past block_size 32, so the sliding window is covered too.
    texts = [generate_text(model, "the ", 70, temperature=0.8, top_k=50, seed=3, use_cache=c) for c in (True, False)]
    assert texts[0] == texts[1] and texts[0].startswith("the ") and len(texts[0]) > 4
    assert generate_text(model, "the ", 20, seed=4) != generate_text(model, "the ", 20, seed=5)


def test_generate_cli(trained, capsys):
    args = ["generate", "--ckpt", str(trained / "ckpt.pt"), "--prompt", "fox ", "--max-new-tokens", "30", "--seed", "1"]
    assert cli(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("fox ")
    assert cli(args + ["--no-cache", "--kernels", "eager"]) == 0 and capsys.readouterr().out.startswith("fox ")
    assert cli(["generate", "--ckpt", str(trained / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err


# ---- 8. learning rate and weight decay ---------------------------------------------------------------------


def test_lr_schedule():
    cfg = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)      # warmup starts at lr/warmup, not 0
    assert [lr_at(s, cfg) for s in range(10)] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    decay = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(0, TrainConfig(steps=10, warmup=0, lr=1e-3, min_lr=0.0)) == pytest.approx(1e-3)
    expected = 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 25 / 100))
    assert lr_at(35, cfg) == pytest.approx(expected)


def test_weight_decay_only_on_block_matrices():
    cfg = TrainConfig(**TINY)
    model = GPT(cfg.model_config())
    decay, no_decay = make_optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)].split(".", 2)[-1] for p in decay["params"])[:4] == [
        "linear1.weight", "linear1.weight", "linear2.weight", "linear2.weight"]
    assert all(p.dim() == 2 and names[id(p)].startswith("blocks.") for p in decay["params"])
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight"} <= {names[id(p)] for p in no_decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_a_torchrun_rank_owning_its_group_leaves_without_the_interpreters_teardown(monkeypatch):
    """A finished run in a rank whose process group train() makes and destroys exits through _exit_now (gloo's
    threads aborted finished ranks in teardown with -6); after an error, in a caller's own group, or alone,
    main returns."""
    from types import SimpleNamespace
    from fasttx.lm import train as train_module
    exits, code = [], [0]
    monkeypatch.setattr(train_module, "_exit_now", exits.append)
    monkeypatch.setattr(train_module, "_run", lambda args, fail: code[0])
    args = SimpleNamespace(nproc_per_node=None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: False)
    assert train_module.main(args) == 0 and exits == [0]
    code[0] = 2  # an error: the normal exit, so that torchrun does not kill rank 0 before it says what went wrong
    assert train_module.main(args) == 2 and exits == [0]
    code[0] = 0
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: True)  # tests/fsdp_worker.py's group
    assert train_module.main(args) == 0 and exits == [0]
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(train_module.dist, "is_initialized", lambda: False)
    assert train_module.main(args) == 0 and exits == [0]
