"""Which malloc serves this process, and how to run the suite under another.

Why it matters: glibc malloc serves large blocks with mmap and, once they are
bigger than its dynamic mmap threshold (at most 32 MiB on 64-bit), hands them
back to the OS on free. A fresh large output tensor then comes from new pages
and pays one page fault per 4 KiB page on first touch, every call. tcmalloc
keeps freed memory and reuses it, so the same op can look much faster. The
suite reports which allocator ran and can run under both.
"""
from __future__ import annotations

import glob
import os
from typing import Optional

from fasttx import info as fasttx_info

ALLOCATORS = ("glibc", "tcmalloc")
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)
INSTALL_HINT = ("tcmalloc is not installed, so only glibc malloc is measured. "
                "Install it with `apt-get install libtcmalloc-minimal4` to compare.")
WHY = ("Allocator matters: glibc malloc returns blocks larger than its mmap threshold (<= 32 MiB) to the OS "
       "on free, so every fresh large output pays page faults on first touch; tcmalloc keeps and reuses them.")


def current() -> str:
    """'tcmalloc' when libtcmalloc is mapped into this process (e.g. via LD_PRELOAD), else 'glibc'."""
    return fasttx_info.allocator()


def find_tcmalloc() -> Optional[str]:
    for path in TCMALLOC_PATHS:
        if os.path.exists(path):
            return path
    # One level only: a recursive walk of /usr/lib* never ended on a machine with a symlink loop there.
    found = sorted(glob.glob("/usr/lib*/libtcmalloc_minimal.so*") + glob.glob("/usr/lib*/*/libtcmalloc_minimal.so*"))
    return found[0] if found else None


def default_choice() -> str:
    return "both" if find_tcmalloc() else "glibc"


def expand(choice: str) -> list:
    """'glibc' | 'tcmalloc' | 'both' -> the allocators that can actually run here (prints why not)."""
    wanted = list(ALLOCATORS) if choice == "both" else [choice]
    if "tcmalloc" in wanted and not find_tcmalloc():
        wanted = [a for a in wanted if a != "tcmalloc"] or ["glibc"]
    return wanted


def env_for(allocator: str) -> dict:
    """The environment of a child process that runs under ``allocator``."""
    env = dict(os.environ)
    preload = [p for p in env.get("LD_PRELOAD", "").split() if "libtcmalloc" not in p]
    if allocator == "tcmalloc":
        preload.insert(0, find_tcmalloc())
        # tcmalloc prints a line for every allocation above 1 GiB by default; keep the output readable
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    return env
