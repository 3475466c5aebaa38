"""fasttx benchmark suite: `python -m bench` (see bench/README.md), or bench.run(...) from Python."""
from bench.suite import run

__all__ = ["run"]
