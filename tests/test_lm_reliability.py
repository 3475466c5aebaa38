"""python -m fasttx train / generate / compare when things go wrong: corrupt, tampered and foreign checkpoints,
a diverging run, a full disk, kill -9, Ctrl-C and bad flags. Each ends in one line on stderr and a non-zero
exit, never a traceback or a crash, and the last good checkpoint stays loadable.

Tiny models (2 layers, d_model 32, block 32, batch 4) on a ~24 KB generated corpus, one thread.
"""
import contextlib
import errno
import os
import random
import resource
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fasttx.__main__ import main as cli
from fasttx.lm import checkpoint as ckpt_io
from fasttx.lm.generate import generate_text, load_model
from fasttx.lm.train import TrainConfig, TrainingDiverged, make_optimizer, train
from fasttx.models.gpt import GPT, GPTConfig

from test_lm_train import corpus  # noqa: F401 (a fixture: the same tiny text corpus)

REPO = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=2, d_model=32, n_head=2, block_size=32, batch_size=4)
TINY_FLAGS = ["--n-layer", "2", "--d-model", "32", "--n-head", "2", "--block-size", "32", "--threads", "1",
              "--device", "cpu", "--eval-batches", "2", "--warmup", "5", "--eval-every", "0", "--batch-size", "4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def tiny(corpus, out, **overrides) -> TrainConfig:
    values = dict(out=str(out), **corpus, **TINY, steps=10, warmup=5, eval_every=0, eval_batches=2, ckpt_every=0,
                  threads=1, device="cpu", progress=False)
    values.update(overrides)
    return TrainConfig(**values)


def train_flags(corpus, out, *extra):
    return ["train", *TINY_FLAGS, "--out", str(out), "--data", *corpus["data"], "--cache-dir", corpus["cache_dir"],
            *extra]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    train(tiny(corpus, out, save_safetensors=True))
    return out


def run_cli(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "fasttx", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout, **kw)


def assert_one_line_error(stderr: str, *words, command=None):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert " error: " in lines[0], lines[0]
    if command:
        assert lines[0].startswith(f"fasttx {command}: error: ") or \
            lines[0].startswith(f"python -m fasttx {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def raw(path) -> dict:
    return torch.load(path, weights_only=True)


def sealed(state: dict, path) -> Path:
    """Write a tampered checkpoint with a matching checksum: what a tool that knows the format could write."""
    state = {k: v for k, v in state.items() if k != "sha256"}
    torch.save({**state, "sha256": ckpt_io.state_digest(state)}, path)
    return path


def no_temp_files(folder) -> bool:
    return not [p for p in Path(folder).iterdir() if p.name.endswith(".tmp")]


# ---- item 9: checksums -------------------------------------------------------------------------------------


def test_checkpoint_holds_a_checksum_of_every_value(trained):
    state = raw(trained / "ckpt.pt")
    assert state["version"] == ckpt_io.FORMAT_VERSION == 2
    assert state["sha256"] == ckpt_io.state_digest(state)
    # Every kind of value is covered: a tensor's bytes, its dtype and shape, a plain int, a nested config value.
    for change in ({"step": state["step"] + 1}, {"world_size": 2},
                   {"model_config": {**state["model_config"], "dropout": 0.5}},
                   {"model": {**state["model"], "ln_f.bias": state["model"]["ln_f.bias"].double()}},
                   {"model": {**state["model"], "ln_f.bias": state["model"]["ln_f.bias"][None]}}):
        assert ckpt_io.state_digest({**state, **change}) != state["sha256"], change
    flipped = state["model"]["ln_f.bias"].clone()
    flipped.view(torch.uint8)[5] ^= 1
    assert ckpt_io.state_digest({**state, "model": {**state["model"], "ln_f.bias": flipped}}) != state["sha256"]


def data_records(path):
    """(name, offset, size) of each tensor-data record inside a torch zip file."""
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if "/data/" in i.filename and i.file_size > 0]
    with open(path, "rb") as f:
        found = []
        for info in infos:
            f.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            found.append((info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size))
    return found


def test_a_flipped_byte_anywhere_in_tensor_data_is_refused(trained, tmp_path):
    good = (trained / "ckpt.pt").read_bytes()
    records = data_records(trained / "ckpt.pt")
    assert len(records) > 20  # model, optimizer and RNG tensors
    rng = random.Random(0)
    for name, offset, size in rng.sample(records, 12):
        data = bytearray(good)
        data[offset + rng.randrange(size)] ^= 1 << rng.randrange(8)
        bad = tmp_path / "flipped.pt"
        bad.write_bytes(data)
        with pytest.raises(ckpt_io.CheckpointError, match=r"flipped\.pt"):
            ckpt_io.load_checkpoint(bad)
    run = run_cli("generate", "--ckpt", str(bad), "--max-new-tokens", "5")
    assert run.returncode == 2
    assert_one_line_error(run.stderr, "flipped.pt", command="generate")


def test_tampered_values_are_refused_by_the_checksum(trained, tmp_path):
    state = raw(trained / "ckpt.pt")
    for i, change in enumerate([{"step": 3}, {"train_config": {**state["train_config"], "lr": 1.0}},
                                {"rng": {"cpu": [torch.zeros(5056, dtype=torch.uint8)], "cuda": None}}]):
        torch.save({**state, **change}, tmp_path / f"t{i}.pt")
        with pytest.raises(ckpt_io.CheckpointError, match=rf"t{i}\.pt is corrupt: .*sha256"):
            ckpt_io.load_checkpoint(tmp_path / f"t{i}.pt")
    no_sum = {k: v for k, v in state.items() if k != "sha256"}
    torch.save(no_sum, tmp_path / "nosum.pt")
    with pytest.raises(ckpt_io.CheckpointError, match=r"nosum\.pt has no sha256"):
        ckpt_io.load_checkpoint(tmp_path / "nosum.pt")


def test_version_1_checkpoints_load_with_a_warning(trained, tmp_path, capsys):
    old = {k: v for k, v in raw(trained / "ckpt.pt").items() if k != "sha256"}
    torch.save({**old, "version": 1}, tmp_path / "v1.pt")
    with pytest.warns(ckpt_io.CheckpointWarning, match=r"v1\.pt .*no checksum"):
        assert ckpt_io.load_checkpoint(tmp_path / "v1.pt")["step"] == old["step"]
    assert cli(["generate", "--ckpt", str(tmp_path / "v1.pt"), "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: checkpoint ") and "no checksum" in err and err.count("\n") == 1, err


def test_safetensors_checksum(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = trained / "model.safetensors"
    with safe_open(str(good), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["sha256"] == ckpt_io.state_digest(tensors)
    tensors["ln_f.weight"].view(torch.uint8)[3] ^= 4
    save_file(tensors, tmp_path / "flipped.safetensors", metadata=meta)
    with pytest.raises(ckpt_io.CheckpointError, match=r"flipped\.safetensors is corrupt"):
        load_model(tmp_path / "flipped.safetensors")
    tensors["ln_f.weight"].view(torch.uint8)[3] ^= 4
    save_file(tensors, tmp_path / "old.safetensors", metadata={k: v for k, v in meta.items() if k != "sha256"})
    with pytest.warns(ckpt_io.CheckpointWarning, match="no sha256"):
        load_model(tmp_path / "old.safetensors")


# ---- item 8: the config must describe the tensors the file holds ---------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 10**9}, "vocab_size 1000000000 but the tensors give 256"),
    ({"n_layer": 10**6}, "n_layer 1000000 but the tensors give 2"),
    ({"d_model": 64}, "d_model 64 but the tensors give 32"),
    ({"block_size": 10**9}, "block_size 1000000000 but the tensors give 32"),
    ({"pos_encoding": "sinusoidal", "block_size": 10**9}, "block_size 1000000000 is over the 65536"),
    ({"pos_encoding": "sinusoidal"}, r"unexpected \['pos_emb.weight'\]"),
    ({"n_layer": 1}, "n_layer 1 but the tensors give 2"),
])
def test_configs_that_do_not_match_the_tensors_are_refused(trained, tmp_path, change, message):
    state = raw(trained / "ckpt.pt")
    path = sealed({**state, "model_config": {**state["model_config"], **change}}, tmp_path / "big.pt")
    t0 = time.perf_counter()
    with pytest.raises(ckpt_io.CheckpointError, match=rf"big\.pt.*{message}"):
        load_model(path)
    assert time.perf_counter() - t0 < 10  # refused before anything of the config's size is built


@pytest.mark.filterwarnings("ignore:Validating sparse tensor invariants")
def test_tensors_that_do_not_match_the_config_are_refused(trained, tmp_path):
    state = raw(trained / "ckpt.pt")
    model = state["model"]
    extra_layer = {**model, **{k.replace("blocks.1.", "blocks.7."): v for k, v in model.items() if "blocks.1." in k}}
    nan = model["blocks.0.linear1.weight"].clone()
    nan[0, 0] = float("nan")
    for i, (bad, message) in enumerate([
            ({k: v for k, v in model.items() if k != "ln_f.bias"}, r"missing \['ln_f.bias'\]"),
            (extra_layer, "n_layer 2 but the tensors give 3"),
            ({**model, "ln_f.bias": model["ln_f.bias"].double()}, "dtype.*ln_f.bias torch.float64"),
            ({**model, "ln_f.bias": model["ln_f.bias"][:16]}, r"shape.*ln_f.bias \(16,\)"),
            ({**model, "blocks.0.linear1.weight": nan}, "NaN or Inf.*blocks.0.linear1.weight"),
            ({**model, "ln_f.bias": 1.0}, "not dense tensors")]):
        path = sealed({**state, "model": bad}, tmp_path / f"m{i}.pt")
        with pytest.raises(ckpt_io.CheckpointError, match=rf"m{i}\.pt.*{message}"):
            ckpt_io.load_checkpoint(path)
    torch.save({**state, "model": {**model, "ln_f.bias": model["ln_f.bias"].to_sparse()}}, tmp_path / "sparse.pt")
    with pytest.raises(ckpt_io.CheckpointError, match=r"sparse\.pt: .*sparse_coo tensor; checkpoints hold dense"):
        ckpt_io.load_checkpoint(tmp_path / "sparse.pt")  # a checksum cannot even be computed


def test_generate_cli_refuses_a_huge_config_in_one_line(trained, tmp_path):
    state = raw(trained / "ckpt.pt")
    path = sealed({**state, "model_config": {**state["model_config"], "vocab_size": 10**9}}, tmp_path / "huge.pt")
    run = run_cli("generate", "--ckpt", str(path), "--max-new-tokens", "5")
    assert run.returncode == 2
    assert_one_line_error(run.stderr, "huge.pt", "vocab_size", command="generate")


# ---- item 7: optimizer and RNG state ----------------------------------------------------------------------


def optimizer_cases(opt):
    """(description, tampered optimizer state_dict, expected message) for every way it can fail to fit."""
    state, groups = opt["state"], opt["param_groups"]

    def with_entry(i, **entry):
        return {"state": {**state, i: {**state[i], **entry}}, "param_groups": groups}
    first = groups[0]["params"][0]
    shape = state[first]["exp_avg"].shape
    yield "one element", with_entry(first, exp_avg=torch.zeros(1, 1)), r"exp_avg: torch.float32 \(1, 1\)"
    yield "more rows", with_entry(first, exp_avg=torch.zeros(shape[0] + 1, *shape[1:])), "exp_avg"
    yield "flattened", with_entry(first, exp_avg_sq=state[first]["exp_avg_sq"].flatten()), "exp_avg_sq"
    yield "float64", with_entry(first, exp_avg=state[first]["exp_avg"].double()), "float64"
    yield "not a tensor", with_entry(first, exp_avg=1.0), "exp_avg: float"
    yield "NaN moment", with_entry(first, exp_avg=torch.full(shape, float("nan"))), "NaN"
    yield "negative second moment", with_entry(first, exp_avg_sq=-torch.ones(shape)), "negative"
    yield "missing moment", {"state": {**state, first: {"step": state[first]["step"]}}, "param_groups": groups}, \
        "state keys"
    yield "extra key", with_entry(first, max_exp_avg_sq=torch.zeros(shape)), "state keys"
    for bad in (float("nan"), -1.0, 0.5, 1e9):
        yield f"step {bad}", with_entry(first, step=torch.tensor(bad)), "steps"
    yield "unknown id", {"state": {**state, 10**6: state[first]}, "param_groups": groups}, "no group lists"
    yield "one group", {"state": state, "param_groups": groups[:1]}, "1 parameter groups"
    yield "short group", {"state": state, "param_groups": [{**groups[0], "params": groups[0]["params"][1:]},
                                                           groups[1]]}, "group 0 has"
    yield "id twice", {"state": state, "param_groups": [{**groups[0], "params": groups[1]["params"][:1] +
                                                         groups[0]["params"][1:]}, groups[1]]}, "listed twice"


def test_optimizer_state_that_does_not_fit_is_refused_before_use(trained):
    saved = ckpt_io.load_checkpoint(trained / "ckpt.pt")
    cfg = TrainConfig(**TINY)
    cases = list(optimizer_cases(saved["optimizer"]))
    assert len(cases) > 15
    for what, opt, message in cases:
        model = GPT(cfg.model_config())
        optimizer = make_optimizer(model, cfg)
        with pytest.raises(ValueError, match=rf"ckpt\.pt: the optimizer state does not fit the model: .*{message}"):
            ckpt_io.restore_training_state({**saved, "optimizer": opt}, trained / "ckpt.pt", model, optimizer)
        assert not optimizer.state, what  # nothing was loaded
    model = GPT(cfg.model_config())
    optimizer = make_optimizer(model, cfg)
    assert ckpt_io.restore_training_state(saved, trained / "ckpt.pt", model, optimizer)


def test_resume_keeps_the_runs_hyperparameters(trained):
    saved = ckpt_io.load_checkpoint(trained / "ckpt.pt")
    cfg = TrainConfig(**TINY, weight_decay=0.5)
    model = GPT(cfg.model_config())
    optimizer = make_optimizer(model, cfg)
    saved["optimizer"]["param_groups"][0]["betas"] = "tampered"
    ckpt_io.restore_training_state(saved, trained / "ckpt.pt", model, optimizer)
    assert optimizer.param_groups[0]["weight_decay"] == 0.5 and optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert len(optimizer.state) == len(saved["optimizer"]["state"])


def test_resume_with_a_wrong_shaped_optimizer_tensor_is_one_line_not_a_segfault(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, stop_at=5))
    state = raw(out / "ckpt.pt")
    # Before the check this ran the fused AdamW on a 1-element exp_avg: exit 139 (SIGSEGV) at 7b2e417.
    opt = next(o for what, o, _ in optimizer_cases(state["optimizer"]) if what == "one element")
    sealed({**state, "optimizer": opt}, out / "ckpt.pt")
    run = run_cli(*train_flags(corpus, out, "--steps", "10", "--resume"))
    assert run.returncode == 2, run.stderr  # a segfault is -11
    assert_one_line_error(run.stderr, "ckpt.pt", "optimizer state does not fit", command="train")


@pytest.mark.parametrize("rng, message", [
    ({"cpu": [torch.zeros(5056, dtype=torch.uint8)], "cuda": None}, "CPU RNG state of rank 0 is invalid"),
    ({"cpu": [torch.zeros(16, dtype=torch.uint8)], "cuda": None}, "uint8 tensor of 5056 bytes, got torch.uint8"),
    ({"cpu": [torch.zeros(5056)], "cuda": None}, "got torch.float32"),
    ({"cpu": ["state"], "cuda": None}, "got str"),
    ({"cpu": [], "cuda": None}, "one CPU"),
    ({"cpu": None, "cuda": None}, "one CPU"),
    ({"cpu": [torch.get_rng_state()], "cuda": [torch.zeros(3, dtype=torch.uint8)]}, "cuda RNG state of rank 0"),
])
def test_corrupt_rng_state_is_refused(trained, tmp_path, rng, message):
    state = raw(trained / "ckpt.pt")
    path = sealed({**state, "rng": rng}, tmp_path / "rng.pt")
    with pytest.raises(ckpt_io.CheckpointError, match=rf"rng\.pt: .*{message}"):
        ckpt_io.load_checkpoint(path)


# ---- item 10: divergence and bad numbers -----------------------------------------------------------------


def test_divergence_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(tiny(corpus, out, stop_at=4))
    good = (out / "ckpt.pt").read_bytes()
    import fasttx.lm.train as train_module

    real_step = train_module.train_step
    for where, bad in (("loss", float("nan")), ("loss", float("inf")), ("norm", float("inf")),
                       ("norm", float("nan"))):
        def poisoned(model, *args, bad=bad, where=where, **kw):
            loss, norm = real_step(model, *args, **kw)
            with torch.no_grad():  # what a blown-up update leaves behind
                model.blocks[0].linear1.weight.fill_(bad)
            return (loss * bad, norm) if where == "loss" else (loss, norm * bad)
        monkeypatch.setattr(train_module, "train_step", poisoned)
        with pytest.raises(TrainingDiverged, match=rf"diverged at step 5: .*{bad}.*ckpt\.pt \(step 4\) is kept"):
            train(tiny(corpus, out, resume=True, ckpt_every=1))
        assert (out / "ckpt.pt").read_bytes() == good
        assert cli(train_flags(corpus, out, "--steps", "10", "--resume", "--ckpt-every", "1")) == 1
        assert_one_line_error(capsys.readouterr().err, "diverged at step 5", command="train")
        assert (out / "ckpt.pt").read_bytes() == good
    monkeypatch.setattr(train_module, "train_step", real_step)
    assert train(tiny(corpus, out, resume=True))["step"] == 10  # and the good checkpoint resumes


def test_a_real_divergence_from_the_command_line(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, stop_at=2, ckpt_every=1))
    good = (out / "ckpt.pt").read_bytes()
    run = run_cli(*train_flags(corpus, out, "--steps", "40", "--resume", "--lr", "1e30", "--min-lr", "0",
                               "--ckpt-every", "1"))
    assert run.returncode == 1, run.stdout + run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("warning: resuming")]
    assert_one_line_error("\n".join(lines), "training diverged", command="train")
    last = ckpt_io.load_checkpoint(out / "ckpt.pt")  # the last good one: maybe later than step 2, never NaN
    assert all(torch.isfinite(t).all() for t in last["model"].values())
    assert last["step"] >= 2 and ((out / "ckpt.pt").read_bytes() == good or last["step"] > 2)


def test_save_refuses_non_finite_weights(tmp_path):
    model = GPT(GPTConfig(**{k: v for k, v in TINY.items() if k != "batch_size"}))
    optimizer = make_optimizer(model, TrainConfig(**TINY))
    with torch.no_grad():
        model.ln_f.weight[0] = float("inf")
    with pytest.raises(ckpt_io.CheckpointWriteError, match="not writing .*ckpt.pt: .*NaN or Inf.*ln_f.weight"):
        ckpt_io.save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=optimizer, step=1,
                                model_config=model.config, train_config={}, rng=ckpt_io.capture_rng("cpu"))
    assert not (tmp_path / "ckpt.pt").exists() and no_temp_files(tmp_path)
    with pytest.raises(ckpt_io.CheckpointWriteError, match="NaN or Inf"):
        ckpt_io.save_safetensors(tmp_path / "model.safetensors", model)


BAD_FLAGS = [("train", flag, value) for flag, values in {
    "--lr": ["inf", "nan", "0", "-1e-3", "abc"], "--min-lr": ["-1", "inf"], "--grad-clip": ["nan", "-1", "inf"],
    "--weight-decay": ["-0.1", "nan"], "--dropout": ["1", "-0.1", "nan"], "--steps": ["0", "-5", "1.5"],
    "--batch-size": ["0"], "--grad-accum": ["0"], "--warmup": ["-1"], "--seed": ["-1", str(2**64)],
    "--eval-every": ["-1"], "--eval-batches": ["0"], "--ckpt-every": ["-1"], "--log-every": ["0"],
    "--stop-at": ["-1"], "--threads": ["-1", "0"], "--n-layer": ["0"], "--n-head": ["-2"], "--d-model": ["0"],
    "--block-size": ["0"]}.items() for value in values]
BAD_FLAGS += [("generate", flag, value) for flag, values in {
    "--temperature": ["nan", "inf", "-1", "-inf"], "--max-new-tokens": ["-1"], "--top-k": ["-1"],
    "--seed": ["-3"]}.items() for value in values]
BAD_FLAGS += [("compare", flag, value) for flag, values in {
    "--lr": ["inf", "0"], "--threads": ["-1"], "--steps": ["0"], "--warmup-steps": ["-1"], "--seed": ["-1"],
    "--d-model": ["0"]}.items() for value in values]


@pytest.mark.parametrize("command, flag, value", BAD_FLAGS)
def test_bad_numbers_are_refused_by_argparse(command, flag, value, capsys):
    extra = ["--ckpt", "x.pt"] if command == "generate" else []
    with pytest.raises(SystemExit) as exit_info:
        cli([command, *extra, f"{flag}={value}"])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, f"argument {flag}:", command=command)


def test_cli_errors_are_one_line(trained, tmp_path, capsys):
    cases = [(["generate", "--ckpt", str(tmp_path / "none.pt")], "none.pt"),
             (["generate", "--ckpt", str(trained / "ckpt.pt"), "--top-k", "300"], "top_k"),
             (["train", "--out", str(trained), "--steps", "12"], "pass --resume"),
             (["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "nothing")], "does not exist"),
             (["compare", "--steps", "2", "--warmup-steps", "2"], "warmup_steps"),
             (["compare", "--device", "tpu9"], "tpu9")]
    if not torch.cuda.is_available():
        cases += [(["generate", "--ckpt", str(trained / "ckpt.pt"), "--device", "cuda"], "no CUDA device"),
                  (["train", "--out", str(tmp_path / "y"), "--device", "cuda"], "no CUDA device"),
                  (["compare", "--quick", "--device", "cuda"], "no CUDA device")]
    for args, word in cases:
        assert cli(args) == 2, args
        assert_one_line_error(capsys.readouterr().err, word, command=args[0])


# ---- item 13: sampling temperature ----------------------------------------------------------------------


def test_tiny_temperatures_sample_like_greedy(trained):
    model = load_model(trained / "ckpt.pt")
    greedy = generate_text(model, "the ", 30, temperature=0.0)
    for t in (1e-45, 5e-324, 1e-300, 1e-12):
        for top_k in (None, 5):
            assert generate_text(model, "the ", 30, temperature=t, top_k=top_k, seed=1) == greedy, (t, top_k)
    assert generate_text(model, "the ", 30, temperature=1e300, seed=1) != greedy  # uniform: some other byte
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature must be finite and >= 0"):
            generate_text(model, "the ", 3, temperature=bad)


def test_generate_cli_with_a_tiny_temperature(trained):
    run = run_cli("generate", "--ckpt", str(trained / "ckpt.pt"), "--prompt", "the ", "--max-new-tokens", "20",
                  "--temperature", "1e-45")
    assert run.returncode == 0 and not run.stderr.strip(), run.stderr
    assert run.stdout.rstrip("\n") == generate_text(load_model(trained / "ckpt.pt"), "the ", 20, temperature=0.0)


# ---- item 13: file modes ----------------------------------------------------------------------------------


def test_files_get_the_umasks_mode(corpus, tmp_path):
    old = os.umask(0o027)
    try:
        train(tiny(corpus, tmp_path / "run", steps=2, save_safetensors=True))
    finally:
        os.umask(old)
    for name in ("ckpt.pt", "metrics.jsonl", "model.safetensors"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o640, name


# ---- item 11: disk full, kill -9, stale temp files --------------------------------------------------------


def test_disk_full_while_saving_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    train(tiny(corpus, out, stop_at=4, save_safetensors=True))
    good = (out / "ckpt.pt").read_bytes()
    real_fsync = os.fsync

    def full(fd):  # the disk fills up while the checkpoint's temp file is written
        if ".ckpt.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ckpt_io.CheckpointWriteError, match=r"no space left on device while writing .*ckpt\.pt"):
        train(tiny(corpus, out, resume=True, save_safetensors=True))
    assert (out / "ckpt.pt").read_bytes() == good and no_temp_files(out)
    assert cli(train_flags(corpus, out, "--steps", "10", "--resume")) == 1
    assert_one_line_error(capsys.readouterr().err, "no space left on device", "ckpt.pt", command="train")
    assert (out / "ckpt.pt").read_bytes() == good and no_temp_files(out)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert train(tiny(corpus, out, resume=True))["step"] == 10


def test_a_file_size_limit_hit_by_the_real_writer_is_one_line(corpus, tmp_path):
    # The kernel refuses the write itself (EFBIG under RLIMIT_FSIZE): the same path as a full disk, no mocks.
    out = tmp_path / "run"
    train(tiny(corpus, out, stop_at=4))
    good = (out / "ckpt.pt").read_bytes()

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(good) // 2, len(good) // 2))
    run = run_cli(*train_flags(corpus, out, "--steps", "10", "--resume"), preexec_fn=limit)
    assert run.returncode == 1, run.stdout + run.stderr
    assert_one_line_error(run.stderr, "cannot write", "ckpt.pt", "File too large", command="train")
    assert (out / "ckpt.pt").read_bytes() == good and no_temp_files(out)


def test_stale_temp_files_are_removed_by_the_next_save(corpus, tmp_path):
    out = tmp_path / "run"
    train(tiny(corpus, out, stop_at=4))
    stale = [out / ".ckpt.pt.0123456789abcdef.tmp", out / ".metrics.jsonl.fedcba9876543210.tmp"]
    kept = [out / ".ckpt.pt.notours.tmp", out / "ckpt.pt.0123456789abcdef.tmp", out / "notes.txt"]
    for p in stale + kept:
        p.write_bytes(b"half a file")
    train(tiny(corpus, out, resume=True))
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_kill_9_during_saves_leaves_a_loadable_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fasttx", *train_flags(corpus, out, "--steps", "100000", "--ckpt-every", "1")]
    rng = random.Random(0)
    for round_ in range(2):
        before = (out / "ckpt.pt").stat().st_mtime_ns if round_ else None
        proc = subprocess.Popen(cmd + (["--resume"] if round_ else []), cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(FileNotFoundError):
                    if (out / "ckpt.pt").stat().st_mtime_ns != before:
                        break  # this process is saving a checkpoint every step now
                time.sleep(0.005)
            assert proc.poll() is None
            time.sleep(rng.uniform(0.0, 0.3))  # a checkpoint a step: many kills land in a save
        finally:
            proc.kill()
            proc.wait()
        saved = ckpt_io.load_checkpoint(out / "ckpt.pt")
        assert saved["step"] >= 1
    run = run_cli(*train_flags(corpus, out, "--steps", "100000", "--resume", "--stop-at", str(saved["step"] + 2)))
    assert run.returncode == 0, run.stderr
    assert ckpt_io.load_checkpoint(out / "ckpt.pt")["step"] == saved["step"] + 2 and no_temp_files(out)


# ---- item 13: Ctrl-C to a multi-process run ---------------------------------------------------------------


def wait_for_steps(proc, metrics: Path, n: int, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"training ended or stalled before {n} steps")


def test_ctrl_c_to_a_launched_group_checkpoints_and_exits_130(corpus, tmp_path):
    # What a terminal's Ctrl-C does: SIGINT to the launcher's process group. torchrun ends such a run in a
    # SignalException traceback and exit code 1; `train --nproc-per-node` in one line and 130.
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "fasttx", *train_flags(corpus, out, "--nproc-per-node", "2", "--batch-size", "2",
                                                         "--steps", "5000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_for_steps(proc, out / "metrics.jsonl", 3)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout + stderr
    assert_one_line_error(stderr.replace("fasttx train: interrupted", "fasttx train: error: interrupted"),
                          "interrupted by signal 2", command="train")
    saved = ckpt_io.load_checkpoint(out / "ckpt.pt")
    assert saved["world_size"] == 2 and saved["step"] >= 3 and f"checkpoint of step {saved['step']}" in stdout
    run = run_cli(*train_flags(corpus, out, "--nproc-per-node=2", "--batch-size", "2", "--steps", "5000",
                               "--resume", "--stop-at", str(saved["step"] + 2)))
    assert run.returncode == 0, run.stderr
    assert ckpt_io.load_checkpoint(out / "ckpt.pt")["step"] == saved["step"] + 2


def test_a_failing_launched_group_is_one_line(corpus, tmp_path):
    run = run_cli(*train_flags(corpus, tmp_path / "none", "--nproc-per-node", "2", "--resume"))
    assert run.returncode == 2
    assert_one_line_error(run.stderr, "ckpt.pt does not exist", command="train")


def test_a_failed_write_stops_every_rank_in_one_line(corpus, tmp_path):
    out = tmp_path / "ddp"

    def limit():  # rank 0 cannot write the checkpoint; rank 1 must not wait for it forever
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    run = run_cli(*train_flags(corpus, out, "--nproc-per-node", "2", "--batch-size", "2", "--steps", "3"),
                  preexec_fn=limit)
    assert run.returncode == 1, run.stdout + run.stderr
    assert_one_line_error(run.stderr, "cannot write", "ckpt.pt", command="train")
    assert not (out / "ckpt.pt").exists() and no_temp_files(out)


@pytest.mark.parametrize("command, target", [("train", "fasttx.lm.train.train"),
                                             ("generate", "fasttx.lm.generate.generate_text"),
                                             ("compare", "fasttx.lm.compare.compare")])
def test_ctrl_c_outside_the_training_loop_is_one_line(trained, command, target, monkeypatch, capsys):
    # Before the loop installs its handler (data, model), while sampling, while comparing: Python's own
    # KeyboardInterrupt, which would print a traceback.
    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(target, interrupted)
    args = {"train": ["train", "--out", str(trained.parent / "new")], "compare": ["compare", "--quick"],
            "generate": ["generate", "--ckpt", str(trained / "ckpt.pt")]}[command]
    assert cli(args) == 130
    err = capsys.readouterr().err
    assert err.startswith(f"fasttx {command}: interrupted") and err.count("\n") == 1, err
