"""Tests of the Triton kernels run on CPU tensors by the Triton interpreter.

The interpreter is chosen when triton is first imported, so TRITON_INTERPRET=1
must be in the environment of the whole pytest process:

    TRITON_INTERPRET=1 pytest tests/interpreter
"""
import os
import sys

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.exit("tests/interpreter needs the Triton interpreter; run them as "
                "`TRITON_INTERPRET=1 pytest tests/interpreter` (TRITON_INTERPRET is "
                f"{os.environ.get('TRITON_INTERPRET')!r})", returncode=4)

# tests/tolerance.py, importable however pytest was pointed at this folder.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
