"""Byte-level (vocab 256) training data for the reference language model.

A corpus is a list of files turned into one flat uint8 token file (the raw
bytes, byte 0 between files) that is cached on disk and read through a
memmap, so corpora larger than memory work and nothing is tokenized twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

SEPARATOR = 0
SPLITS = ("train", "val")
_CHUNK = 1 << 20
# Bump when the token file layout changes, so old caches are not reused.
_FORMAT_VERSION = 1
# Test folders hold odd fixtures (bad encodings, huge generated files) that
# are poor training text; installed third-party packages are not the stdlib.
_SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}


def default_corpus_files() -> list[Path]:
    """The stdlib's .py files: every machine with the same Python has the same corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIPPED_STDLIB_DIRS]
        found += [Path(folder, n) for n in names if n.endswith(".py")]
    if not found:
        raise RuntimeError(f"no .py files found in the standard library at {root}")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def collect_files(paths: list[str]) -> list[Path]:
    """Files given by the user: files as-is, folders walked (hidden entries skipped)."""
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            inside = []
            for folder, dirs, names in os.walk(path):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                inside += [Path(folder, n) for n in names if not n.startswith(".")]
            inside = [f for f in inside if f.is_file()]  # drops sockets, fifos, broken links
            if not inside:
                raise ValueError(f"data folder {raw!r} holds no (non-hidden) files")
            files += sorted(inside, key=lambda p: p.relative_to(path).as_posix())
        else:
            raise ValueError(f"data path {raw!r} does not exist")
    if not files:
        raise ValueError("no data files given")
    return files


def _sidecar(token_path: Path) -> Path:
    return token_path.with_suffix(".json")


def open_temp_beside(path: Path) -> tuple[Path, int]:
    """A new file .<name>.<random>.tmp next to path, opened for writing: (its path, its descriptor).
    Mode 0o666 (mkstemp's is 0o600), so the umask gives the renamed file any new file's mode."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _write_atomically(out_path: Path, write) -> None:
    """Readers see either no file or a complete one, even if we are killed midway."""
    tmp, fd = open_temp_beside(out_path)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
        os.replace(tmp, out_path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_token_file(files: list[Path], out_path: Path) -> Path:
    """Concatenate the files' bytes, byte 0 between files, streaming in chunks."""
    out_path = Path(out_path)
    digest = hashlib.sha256()
    total = 0

    def write_tokens(out):
        nonlocal total
        for i, name in enumerate(files):
            if i:
                out.write(bytes([SEPARATOR]))
                digest.update(bytes([SEPARATOR]))
                total += 1
            with open(name, "rb") as src:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    total += len(chunk)

    _write_atomically(out_path, write_tokens)
    info = {"files": len(files), "tokens": total, "sha256": digest.hexdigest()}
    _write_atomically(_sidecar(out_path), lambda out: out.write(json.dumps(info, indent=1).encode()))
    return out_path


def _is_valid_cache(token_path: Path) -> bool:
    """Re-hashing costs a read of the file (~0.05 s for the stdlib) but catches a damaged cache."""
    try:
        info = json.loads(_sidecar(token_path).read_text())
        if token_path.stat().st_size != info["tokens"]:
            return False
        digest = hashlib.sha256()
        with open(token_path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return digest.hexdigest() == info["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def default_cache_dir() -> Path:
    """$FASTTX_CACHE, else ~/.cache/fasttx."""
    return Path(os.environ.get("FASTTX_CACHE") or Path.home() / ".cache" / "fasttx")


def prepare_corpus(data_paths: list[str] | None, cache_dir: Path) -> Path:
    """The token file for data_paths (the stdlib when empty), built once and then reused.

    The cache name hashes each file's resolved path, size and mtime, so editing
    any input file builds a new token file instead of reusing a stale one.
    """
    files = collect_files(data_paths) if data_paths else default_corpus_files()
    key = [_FORMAT_VERSION] + [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    name = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    token_path = cache_dir / f"tokens-{name}.bin"
    if not _is_valid_cache(token_path):
        build_token_file(files, token_path)
    return token_path


def _batch_seed(seed: int, split: str, step: int, micro_step: int) -> int:
    # sha256 rather than hash(): str hashes are salted per process, and the
    # batch must be the same after a restart and on every rank.
    digest = hashlib.sha256(f"{seed}/{split}/{step}/{micro_step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid torch seed


class TokenData:
    """Random fixed-length windows of a token file, split into train and val.

    The split is contiguous: the last val_fraction of the stream is val. A
    random per-token split would let training windows overlap val windows and
    leak val text into training.
    """

    def __init__(self, token_path: str | os.PathLike, block_size: int, val_fraction: float = 0.05):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.token_path = Path(token_path)
        self.block_size = block_size
        n_tokens = self.token_path.stat().st_size
        n_val = int(n_tokens * val_fraction)
        if min(n_tokens - n_val, n_val) < block_size + 1:
            raise ValueError(
                f"{self.token_path} is too small: {n_tokens - n_val} train and {n_val} val tokens, "
                f"each split needs at least block_size + 1 = {block_size + 1}"
            )
        tokens = np.memmap(self.token_path, mode="r", dtype=np.uint8)
        self._splits = {"train": tokens[: n_tokens - n_val], "val": tokens[n_tokens - n_val :]}

    @property
    def n_train_tokens(self) -> int:
        return len(self._splits["train"])

    @property
    def n_val_tokens(self) -> int:
        return len(self._splits["val"])

    def tokens(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._splits[split]

    def get_batch(self, split: str, step: int, micro_step: int, batch_size: int, seed: int,
                  rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 of shape (batch_size, block_size), y being x shifted by one token.

        A pure function of (seed, split, step, micro_step): resuming needs no
        sampler state, and each rank takes its slice of the same global batch,
        so N ranks of batch b see exactly the rows of one rank of batch N*b.
        """
        tokens = self.tokens(split)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        gen = torch.Generator().manual_seed(_batch_seed(seed, split, step, micro_step))
        T = self.block_size
        offsets = torch.randint(0, len(tokens) - T, (batch_size * world_size,), generator=gen)
        mine = offsets[rank * batch_size : (rank + 1) * batch_size].tolist()
        # Copy one window at a time so the memmap is never read as a whole.
        rows = torch.stack([torch.from_numpy(np.array(tokens[o : o + T + 1], dtype=np.int64)) for o in mine])
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def val_batches(self, batch_size: int, n_batches: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The same n_batches val batches on every call, so val losses compare across steps."""
        for i in range(n_batches):
            yield self.get_batch("val", step=i, micro_step=0, batch_size=batch_size, seed=seed)


def unigram_entropy(token_path_or_data: TokenData | str | os.PathLike, split: str = "val") -> float:
    """Entropy of the split's byte frequencies in nats: the loss of a model that ignores context.

    A path is split like TokenData's default val_fraction.
    """
    data = token_path_or_data
    if not isinstance(data, TokenData):
        data = TokenData(data, block_size=1)
    tokens = data.tokens(split)
    counts = np.zeros(256, dtype=np.int64)
    for start in range(0, len(tokens), _CHUNK):
        counts += np.bincount(tokens[start : start + _CHUNK], minlength=256)
    p = counts[counts > 0] / len(tokens)
    return max(0.0, float(-(p * np.log(p)).sum()))  # a constant stream gives -0.0
