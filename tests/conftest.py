import os

import pytest

# The Triton interpreter must be switched on before triton is first imported,
# so its tests run in their own pytest process: `TRITON_INTERPRET=1 pytest tests/interpreter`.
if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    collect_ignore = ["interpreter"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")
