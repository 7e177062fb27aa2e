"""Optional C++ kernels, found or built on first use, never required.

`int4_mm()` returns torch.ops.phiforge.int4_mm, or None when it cannot be had: no AVX2/F16C CPU, no C++ compiler
or ninja, or a failed build. Callers then use pure torch (see phiforge/quant.py), so importing never fails.
The build is cached under $PHIFORGE_CACHE (default ~/.cache/phiforge/kernels), keyed by source and torch version.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch

from phiforge.utils import cache_dir

_SRC = Path(__file__).with_name("int4_mm.cpp")
_state: dict = {}


def _cpu_ok() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f" {f}" in flags for f in ("avx2", "fma", "f16c"))


def _build() -> bool:
    from torch.utils import cpp_extension

    if not (_cpu_ok() and shutil.which(os.environ.get("CXX", "c++")) and cpp_extension.is_ninja_available()):
        return False
    # -fopenmp: at::parallel_for is a header-inlined `#pragma omp parallel` under torch's OpenMP backend; without the
    # flag it silently runs on one thread. Compiled with it but not linked against a libgomp of our own, the GOMP
    # symbols resolve to the runtime torch already loaded, so there is one thread pool, torch's.
    cflags = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-DNDEBUG"]
    key = hashlib.sha256(_SRC.read_bytes() + torch.__version__.encode() + " ".join(cflags).encode()).hexdigest()[:16]
    root = cache_dir() / "kernels" / key
    root.mkdir(parents=True, exist_ok=True)
    # is_python_module=False: the .so only registers torch.ops.phiforge.*, so no pybind11 headers (faster build).
    cpp_extension.load(name="phiforge_int4", sources=[str(_SRC)], build_directory=str(root), is_python_module=False,
                       extra_cflags=cflags, verbose=False)
    return True


def _register_fake() -> None:
    """Shape rule for torch.compile (the decode step compiles with the kernel inside the graph)."""
    if torch._C._dispatch_has_kernel_for_dispatch_key("phiforge::int4_mm", "Meta"):
        return
    torch.library.register_fake("phiforge::int4_mm")(lambda x, wt, sm, group_size: x.new_empty(x.shape[0], wt.shape[0]))


def int4_mm():
    """The int4 matmul op (x fp32 [M,K], wt uint8 [Np,K/2], sm fp16 [Np/4,K/G,8] from quant.tile_int4, G) or None."""
    if "int4_mm" not in _state:
        op = None
        try:
            if hasattr(torch.ops.phiforge, "int4_mm") or _build():
                op = torch.ops.phiforge.int4_mm
                _register_fake()
        except Exception as e:  # a broken toolchain must not break inference: fall back to pure torch
            warnings.warn(f"phiforge: int4 C++ kernel unavailable ({type(e).__name__}: {str(e)[:200]}); "
                          "using the slower pure-torch path")
        _state["int4_mm"] = op
    return _state["int4_mm"]
