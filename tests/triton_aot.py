"""Compile Triton kernels ahead of time for a GPU this machine need not have, and inspect them.

``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) without a driver. The cubin's
resource usage, read with the cuobjdump Triton ships, shows register spills
that the interpreter can never reveal. Used by the tests/test_triton_aot*.py files.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# Must not run under the interpreter: it replaces @triton.jit functions with Python.
assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), \
    "AOT compile tests cannot run with TRITON_INTERPRET set; run them in a plain pytest process"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Shared memory a block may use (opt-in maximum per block), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}
ARCHS = tuple(SHARED_LIMIT)

_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class Compiled:
    name: str
    arch: int
    registers: int
    stack: int
    shared: int    # bytes, cuobjdump's static SHARED plus Triton's dynamic metadata.shared
    local: int
    spill_stores: int
    spill_loads: int
    num_warps: int
    ptx: str = field(repr=False)

    def problems(self) -> list[str]:
        """Why this kernel would run badly on its GPU; empty when it is fine."""
        out = []
        if self.spill_stores or self.spill_loads:
            out.append(f"spills {self.spill_stores} bytes stored / {self.spill_loads} loaded")
        if self.local or self.stack:
            out.append(f"uses {self.local} bytes of local memory and {self.stack} of stack")
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"needs {self.shared} bytes of shared memory, sm_{self.arch} has {SHARED_LIMIT[self.arch]}")
        if self.registers * 32 * self.num_warps > 65536:
            out.append(f"{self.registers} registers x {32 * self.num_warps} threads exceed the 64K register file")
        return out


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 3, aligned: tuple = ()) -> Compiled:
    """Compile ``fn`` for sm_``arch``.

    ``signature`` maps every non-constexpr argument to a Triton type ("*fp16", "i32"...) and
    every constexpr to "constexpr"; ``constexprs`` gives their values. ``aligned`` names the
    arguments the JIT would see as 16-divisible (pointers 16-byte aligned, sizes % 16 == 0),
    which is what enables vectorized loads and so the register-heaviest variant.
    """
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": num_warps, "num_stages": num_stages})
    usage = resource_usage(k.asm["cubin"])
    stores, loads = spills(k.asm["ptx"], arch)
    return Compiled(name=k.metadata.name, arch=arch, registers=usage["REG"], stack=usage["STACK"],
                    shared=usage["SHARED"] + k.metadata.shared, local=usage["LOCAL"],
                    spill_stores=stores, spill_loads=loads, num_warps=k.metadata.num_warps, ptx=k.asm["ptx"])


def spills(ptx: str, arch: int) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from `ptxas -v`, run with the flags Triton uses.

    Triton runs ptxas -v itself but throws the log away (and skips ptxas on a cache hit),
    and cuobjdump reports LOCAL but not spills, so ptxas is run again here.
    """
    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                              f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")],
                             check=True, capture_output=True, text=True).stderr
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(found) == 1, f"cannot read spills from ptxas -v:\n{log}"
    return int(found[0][0]), int(found[0][1])


def resource_usage(cubin: bytes) -> dict:
    """REG/STACK/SHARED/LOCAL of the (single) function in ``cubin``, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL|TEXTURE|SURFACE|SAMPLER|CONSTANT\[\d+\]):(\d+)", text))
    missing = {"REG", "STACK", "SHARED", "LOCAL"} - fields.keys()
    assert not missing, f"cuobjdump output lacks {missing}:\n{text}"
    return {k: int(v) for k, v in fields.items()}


def signature(arg_types: dict, dtype: str, constexprs: dict) -> dict:
    """A full ASTSource signature: ``arg_types`` with "{dtype}" filled in ("fp16"...), plus the constexprs."""
    sig = {name: t.format(dtype=dtype) for name, t in arg_types.items()}
    sig.update({name: "constexpr" for name in constexprs})
    return sig


def divisible_args(arg_types: dict) -> tuple:
    """The arguments the JIT marks 16-divisible when every pointer is aligned and every size
    is a multiple of 16, the common case and the one with vectorized (widest) accesses."""
    return tuple(name for name, t in arg_types.items() if t.startswith("*") or t == "i32")
