import hashlib
import json
import math
import os
import sysconfig

import numpy as np
import pytest
import torch

from fasttx.lm.data import (
    TokenData,
    build_token_file,
    collect_files,
    default_cache_dir,
    default_corpus_files,
    prepare_corpus,
    unigram_entropy,
)


def write_tokens(path, data: bytes):
    path.write_bytes(data)
    return path


def random_tokens(tmp_path, n=5000, seed=0):
    data = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()
    return write_tokens(tmp_path / "random.bin", data), data


# --- corpus files -------------------------------------------------------------


def test_default_corpus_is_sorted_stdlib_python():
    files = default_corpus_files()
    assert files and files == default_corpus_files()
    posix = [f.as_posix() for f in files]
    assert all(p.endswith(".py") for p in posix)
    assert any(p.endswith("/os.py") for p in posix)
    assert not any("site-packages" in p or "dist-packages" in p for p in posix)
    assert not any("/test/" in p or "/tests/" in p or "/idle_test/" in p for p in posix)
    root = sysconfig.get_paths()["stdlib"]
    rel = [os.path.relpath(p, root).replace(os.sep, "/") for p in posix]
    assert rel == sorted(rel)


def test_collect_files_walks_folders_and_skips_hidden(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".hidden").mkdir()
    (tmp_path / "d" / "b.txt").write_text("b")
    (tmp_path / "d" / "sub" / "a.txt").write_text("a")
    (tmp_path / "d" / ".dot.txt").write_text("x")
    (tmp_path / "d" / ".hidden" / "c.txt").write_text("c")
    (tmp_path / "single.txt").write_text("s")
    files = collect_files([str(tmp_path / "single.txt"), str(tmp_path / "d")])
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["single.txt", "d/b.txt", "d/sub/a.txt"]


def test_collect_files_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="nope"):
        collect_files([str(missing)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        collect_files([str(tmp_path / "empty")])


# --- token file and cache -----------------------------------------------------


def test_build_token_file_round_trip(tmp_path):
    contents = [b"hello\n", b"", "caf\u00e9 \u2603".encode()]
    files = []
    for i, c in enumerate(contents):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_bytes(c)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = build_token_file(files, out_dir / "tokens.bin")
    assert out.read_bytes() == b"\0".join(contents)
    assert sorted(p.name for p in out_dir.iterdir()) == ["tokens.bin", "tokens.json"]  # no temp files left
    info = json.loads((out_dir / "tokens.json").read_text())
    assert info["files"] == 3 and info["tokens"] == len(b"\0".join(contents))
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_token_cache_gets_the_umask_mode(tmp_path, umask):
    """The token file and its sidecar get the mode any new file gets (mkstemp's 0600 once)."""
    (tmp_path / "a.txt").write_text("some text\n")
    old = os.umask(umask)
    try:
        out = build_token_file([tmp_path / "a.txt"], tmp_path / "tokens.bin")
    finally:
        os.umask(old)
    for path in (out, tmp_path / "tokens.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_prepare_corpus_reuses_and_invalidates_cache(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("first version\n")
    cache = tmp_path / "cache"
    first = prepare_corpus([str(data)], cache)
    stamp = (first.stat().st_mtime_ns, first.stat().st_ino)
    assert prepare_corpus([str(data)], cache) == first
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp

    first.write_bytes(b"corrupt")  # a damaged cache fails its sidecar check and is rebuilt
    assert prepare_corpus([str(data)], cache) == first
    assert first.read_bytes() == b"first version\n"

    (data / "a.txt").write_text("second, longer version\n")
    second = prepare_corpus([str(data)], cache)
    assert second != first and second.read_bytes() == b"second, longer version\n"


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTTX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("FASTTX_CACHE")
    assert default_cache_dir().parts[-2:] == (".cache", "fasttx")


# --- batches ------------------------------------------------------------------


def test_batch_shapes_and_targets(tmp_path):
    path, raw = random_tokens(tmp_path)
    data = TokenData(path, block_size=16)
    assert data.n_train_tokens + data.n_val_tokens == len(raw)
    assert data.n_val_tokens == int(len(raw) * 0.05)
    x, y = data.get_batch("train", step=3, micro_step=1, batch_size=4, seed=7)
    assert x.shape == y.shape == (4, 16)
    assert x.dtype == y.dtype == torch.int64
    for xr, yr in zip(x, y):
        o = raw.find(bytes(xr.tolist()))
        assert o >= 0
        assert yr.tolist() == list(raw[o + 1 : o + 17])


def test_batch_is_pure_function_of_step(tmp_path):
    path, _ = random_tokens(tmp_path)
    data = TokenData(path, block_size=8)
    args = dict(split="train", step=5, micro_step=2, batch_size=4, seed=1)
    x, y = data.get_batch(**args)
    x2, y2 = TokenData(path, block_size=8).get_batch(**args)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    for change in ({"step": 6}, {"micro_step": 3}, {"seed": 2}):
        assert not torch.equal(x, data.get_batch(**{**args, **change})[0])


def test_ranks_split_the_global_batch(tmp_path):
    path, _ = random_tokens(tmp_path)
    data = TokenData(path, block_size=8)
    args = dict(split="train", step=4, micro_step=1, seed=3)
    x_all, y_all = data.get_batch(batch_size=6, **args)
    parts = [data.get_batch(batch_size=3, rank=r, world_size=2, **args) for r in range(2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), x_all)
    assert torch.equal(torch.cat([p[1] for p in parts]), y_all)


def test_windows_stay_inside_their_split(tmp_path):
    # 300 'a' train tokens then 100 'b' val tokens; a window crossing the border would mix them.
    path = write_tokens(tmp_path / "ab.bin", b"a" * 300 + b"b" * 100)
    data = TokenData(path, block_size=99, val_fraction=0.25)
    for step in range(20):
        for split, byte in (("train", ord("a")), ("val", ord("b"))):
            x, y = data.get_batch(split, step=step, micro_step=0, batch_size=8, seed=0)
            assert (x == byte).all() and (y == byte).all()


def test_val_batches_repeat(tmp_path):
    path, _ = random_tokens(tmp_path)
    data = TokenData(path, block_size=8)
    first = list(data.val_batches(batch_size=2, n_batches=3, seed=0))
    second = list(data.val_batches(batch_size=2, n_batches=3, seed=0))
    assert len(first) == 3
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(first[0][0], first[1][0])


def test_batch_errors(tmp_path):
    path, _ = random_tokens(tmp_path, n=1000)
    with pytest.raises(ValueError, match="too small"):
        TokenData(path, block_size=50)  # val split has 50 tokens, needs 51
    data = TokenData(path, block_size=8)
    with pytest.raises(ValueError, match="split"):
        data.get_batch("test", step=0, micro_step=0, batch_size=2, seed=0)
    for rank, world_size in ((2, 2), (-1, 1), (0, 0)):
        with pytest.raises(ValueError, match="rank"):
            data.get_batch("train", 0, 0, batch_size=2, seed=0, rank=rank, world_size=world_size)
    with pytest.raises(ValueError, match="batch_size"):
        data.get_batch("train", 0, 0, batch_size=0, seed=0)


# --- unigram entropy ----------------------------------------------------------


def test_unigram_entropy_uniform_and_constant(tmp_path):
    uniform = write_tokens(tmp_path / "uniform.bin", bytes(range(256)) * 8)
    data = TokenData(uniform, block_size=4, val_fraction=0.5)
    assert unigram_entropy(data) == pytest.approx(math.log(256), abs=1e-6)
    assert unigram_entropy(data, split="train") == pytest.approx(math.log(256), abs=1e-6)
    constant = write_tokens(tmp_path / "constant.bin", b"z" * 1000)
    assert unigram_entropy(constant) == 0.0
