"""python -m fasttx train --fsdp: 2 CPU processes (gloo) sharded with FSDP2 match 1 process on the same
global batch, and its checkpoints resume (under FSDP or in one process) and load for generation.

Tiny models (2 layers, d_model 32, block 32), one thread per rank, few steps.
"""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttx.lm import checkpoint as ckpt_io
from fasttx.lm.generate import generate_text, load_model
from fasttx.lm.data import TokenData, prepare_corpus
from fasttx.lm.train import TrainConfig, evaluate, train

REPO = Path(__file__).resolve().parents[1]
STEPS, STOP = 6, 3
# Each rank: batch 2 with 2 micro-steps (the first without gradient sync) = one process of batch 8 (the same
# rows: micro-batch m of rank r is slice 2m + r of the global batch). 3 eval batches over 2 ranks: uneven.
FLAGS = ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--block-size", "32", "--threads", "1",
         "--device", "cpu", "--eval-batches", "3", "--eval-every", "3", "--warmup", "2", "--steps", str(STEPS),
         "--batch-size", "2", "--grad-accum", "2", "--ckpt-every", "0", "--fsdp"]
# fp32, 6 AdamW steps. FSDP2 reduce-scatters the two ranks' gradients (a sum in another order, then / 2),
# where one process sums 8 rows at once: the losses agree to ~1e-7 relative, the weights to ~1e-6 after
# 6 steps (Adam divides by sqrt(v), which amplifies the last bits of small gradients). A real bug (a rank's
# gradient missed or counted twice, a shard loaded into the wrong place, the optimizer state lost on
# resume) moves the loss by >1e-3 and the weights by the learning rate, 1e-3.
LOSS_TOL = dict(rel=1e-5)
PARAM_TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog def return import class self if else for in".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(600)]
    (folder / "text.txt").write_text("\n".join(lines))
    return {"data": [str(folder / "text.txt")], "cache_dir": str(folder / "cache")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(corpus, out, *extra):
    return ["train", *FLAGS, "--out", str(out), "--data", *corpus["data"], "--cache-dir", corpus["cache_dir"], *extra]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One torchrun launch of 2 ranks (tests/fsdp_worker.py) doing every FSDP run of this file in turn:
    "whole" (6 steps), "fsdp" (stopped after step 3, copied to "at_stop", resumed to 6), "eager" (3 steps),
    "llama" (the LLaMA architecture, 2 query heads sharing 1 key/value head, 3 steps)."""
    root = tmp_path_factory.mktemp("fsdp")
    plan = [train_args(corpus, root / "whole"),
            train_args(corpus, root / "fsdp", "--stop-at", str(STOP)),
            ["copy", str(root / "fsdp"), str(root / "at_stop")],
            train_args(corpus, root / "fsdp", "--resume"),
            train_args(corpus, root / "eager", "--kernels", "eager", "--steps", str(STOP)),
            train_args(corpus, root / "llama", "--arch", "llama", "--n-kv-head", "1", "--steps", str(STOP))]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(REPO / "tests" / "fsdp_worker.py"), json.dumps(plan)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # a hang: end the launcher and its workers, not leave them running
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("the 2-rank FSDP launch hung:\n" + stdout + stderr)
    assert proc.returncode == 0, stdout + stderr
    run = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert "from step 0 to 3 of 6" in run.stdout and "from step 3 to 6 of 6" in run.stdout
    return root


def metrics(out):
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [(r["step"], r["val_loss"]) for r in records
                                                         if "val_loss" in r]


def one_process(corpus, out, **overrides):
    values = dict(out=str(out), **corpus, n_layer=2, d_model=32, n_head=2, block_size=32, batch_size=8,
                  steps=STEPS, warmup=2, eval_every=3, eval_batches=3, ckpt_every=0, threads=1, device="cpu",
                  progress=False)
    return train(TrainConfig(**{**values, **overrides}))


def assert_same_weights(a, b):
    for key in b:
        torch.testing.assert_close(a[key], b[key], **PARAM_TOL, msg=key)


def expected_val(corpus, ckpt_path) -> float:
    """The val loss of a checkpoint over the ranks' val batches (batch 2), in one process."""
    data = TokenData(prepare_corpus(corpus["data"], Path(corpus["cache_dir"])), 32)
    batches = list(data.val_batches(2, 3, 0))
    return evaluate(load_model(ckpt_path), batches)


def test_fsdp_two_ranks_match_one_process_and_resume(corpus, runs, tmp_path):
    """2 ranks under FSDP2 (fused kernels) against 1 process of the same global batch; a run stopped at step
    3 and resumed under FSDP against the uninterrupted FSDP run (exactly); the checkpoint of step 3 resumed
    in one process; generate on the final checkpoint."""
    shutil.copytree(runs / "at_stop", tmp_path / "at_stop")  # resumed below in one process
    single = one_process(corpus, tmp_path / "single")

    # Stopped and resumed under FSDP == uninterrupted under FSDP, bit for bit.
    assert metrics(runs / "fsdp") == metrics(runs / "whole")
    saved = ckpt_io.load_checkpoint(runs / "fsdp" / "ckpt.pt")
    whole = ckpt_io.load_checkpoint(runs / "whole" / "ckpt.pt")
    for key in whole["model"]:
        assert torch.equal(saved["model"][key], whole["model"][key]), key

    # 2 FSDP ranks == 1 process on the same global batch, to float rounding.
    losses, vals = metrics(runs / "fsdp")
    assert len(losses) == STEPS
    assert losses == pytest.approx(single["losses"], **LOSS_TOL)
    assert saved["world_size"] == 2 and saved["step"] == STEPS and saved["train_config"]["fsdp"]
    one = ckpt_io.load_checkpoint(tmp_path / "single" / "ckpt.pt")
    assert set(saved["model"]) == set(one["model"])  # the full state, tied head included
    assert_same_weights(saved["model"], one["model"])
    for i, state in one["optimizer"]["state"].items():  # the AdamW moments, gathered whole, in index order
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved["optimizer"]["state"][i][name], state[name], rtol=1e-3, atol=1e-7,
                                       msg=f"{i} {name}")
    # The val loss: 3 batches over 2 ranks (rank 1 runs an uncounted forward to keep FSDP's collectives paired).
    assert [s for s, _ in vals] == [3, 6]
    assert vals[-1][1] == pytest.approx(expected_val(corpus, runs / "fsdp" / "ckpt.pt"), **LOSS_TOL)

    # The FSDP checkpoint of step 3 resumes in one process (the same file layout) and follows the same path.
    resumed = one_process(corpus, tmp_path / "at_stop", resume=True)
    assert resumed["start_step"] == STOP
    assert resumed["losses"] == pytest.approx(single["losses"][STOP:], **LOSS_TOL)
    assert_same_weights(ckpt_io.load_checkpoint(tmp_path / "at_stop" / "ckpt.pt")["model"], one["model"])

    text = generate_text(load_model(runs / "fsdp" / "ckpt.pt"), "the ", max_new_tokens=8, temperature=0.0)
    assert isinstance(text, str) and len(text) > 0


def test_fsdp_eager_kernels_match_one_process(corpus, runs, tmp_path):
    """kernels="eager" (plain PyTorch over the block's parameters, gathered by FSDP2 around forward_eager)."""
    single = one_process(corpus, tmp_path / "single", kernels="eager", steps=STOP)
    assert metrics(runs / "eager")[0] == pytest.approx(single["losses"], **LOSS_TOL)
    assert_same_weights(ckpt_io.load_checkpoint(runs / "eager" / "ckpt.pt")["model"],
                        ckpt_io.load_checkpoint(tmp_path / "single" / "ckpt.pt")["model"])


def test_fsdp_llama_architecture_matches_one_process(corpus, runs, tmp_path):
    """--arch llama under FSDP2: its blocks gathered around their forward, its untied LM head saved under its
    own name (not overwritten by the embedding's, as a tied head is) and loaded back into the sharded model."""
    single = one_process(corpus, tmp_path / "single", arch="llama", n_kv_head=1, steps=STOP)
    assert metrics(runs / "llama")[0] == pytest.approx(single["losses"], **LOSS_TOL)
    saved = ckpt_io.load_checkpoint(runs / "llama" / "ckpt.pt")
    one = ckpt_io.load_checkpoint(tmp_path / "single" / "ckpt.pt")
    assert set(saved["model"]) == set(one["model"]) and "lm_head.weight" in one["model"]
    assert not torch.equal(saved["model"]["lm_head.weight"], saved["model"]["tok_emb.weight"][:, :32])
    assert_same_weights(saved["model"], one["model"])
    assert set(saved["optimizer"]["state"]) == set(one["optimizer"]["state"])
    for i, state in one["optimizer"]["state"].items():
        torch.testing.assert_close(saved["optimizer"]["state"][i]["exp_avg"], state["exp_avg"], rtol=1e-3,
                                   atol=1e-7, msg=str(i))


def test_sharded_gpt_runs_fasttx_fast_path_and_refuses_what_it_cannot_do():
    """In process, one gloo rank: FSDP2's gathered parameters reach fasttx's ops as plain Parameters (the eager
    fast path, not the registered op), and what the sharded model cannot do is refused in words."""
    import torch.distributed as dist

    from fasttx.lm import fsdp
    from fasttx.models.gpt import GPT, GPTConfig
    from fasttx.ops import _eager

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        config = GPTConfig(n_layer=2, n_head=2, d_model=32, block_size=16)
        reference, model = GPT(config), GPT(config)
        model.load_state_dict(reference.state_dict())
        fsdp.shard(model)
        assert type(model.blocks[0].norm1.weight).__name__ == "DTensor"
        calls = []
        plain_eager = _eager.plain_eager

        def spy(*tensors):
            calls.append(plain_eager(*tensors))
            return calls[-1]
        idx = torch.randint(0, 256, (2, 9))
        modules = [m for m in list(sys.modules.values()) if getattr(m, "plain_eager", None) is plain_eager]
        for m in modules:
            m.plain_eager = spy
        try:
            loss = model(idx[:, :-1], idx[:, 1:])[1]
        finally:
            for m in modules:
                m.plain_eager = plain_eager
        assert calls and all(calls), calls
        torch.testing.assert_close(loss, reference(idx[:, :-1], idx[:, 1:])[1], rtol=1e-6, atol=1e-6)
        with pytest.raises(fsdp.FSDPUnsupported, match="cannot generate"):
            model.generate(idx[:, :4], max_new_tokens=2)
        with pytest.raises(fsdp.FSDPUnsupported, match="GPT only"):
            fsdp.shard(torch.nn.Linear(2, 2))
    finally:
        dist.destroy_process_group()
