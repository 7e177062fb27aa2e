"""Optional C++ kernels, found or built on first use, never required.

`int4_mm()` returns torch.ops.phiforge.int4_mm (int4_mm.cpp) and `bf16_mv()` torch.ops.phiforge.bf16_mv
(bf16_mv.cpp), or None when they cannot be had: no AVX2/F16C CPU, no C++ compiler or ninja, or a failed build.
Callers then use pure torch (phiforge/quant.py, phiforge/fast.py), so importing never fails. Both sources build
into one library.
The build is cached under $PHIFORGE_CACHE (default ~/.cache/phiforge/kernels), keyed by source and torch version.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

from phiforge.utils import cache_dir

_SRCS = [Path(__file__).with_name(n) for n in ("int4_mm.cpp", "bf16_mv.cpp")]
_HDRS = [Path(__file__).with_name("simd.h")]  # part of the cache key: an edit to it must rebuild
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
    src = b"".join(p.read_bytes() for p in _SRCS + _HDRS)
    key = hashlib.sha256(src + torch.__version__.encode() + " ".join(cflags).encode()).hexdigest()[:16]
    root = cache_dir() / "kernels" / key
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "phiforge_kernels.so").exists():  # a first build takes ~20 s: say so rather than hang silently
        print(f"phiforge: building the C++ kernels once (about 20 s; cached in {root})", file=sys.stderr, flush=True)
    # is_python_module=False: the .so only registers torch.ops.phiforge.*, so no pybind11 headers (faster build).
    cpp_extension.load(name="phiforge_kernels", sources=[str(p) for p in _SRCS], build_directory=str(root),
                       is_python_module=False, extra_cflags=cflags, verbose=False)
    return True


def _register_fake() -> None:
    """Shape rules for torch.compile (the decode step compiles with the kernels inside the graph)."""
    if not torch._C._dispatch_has_kernel_for_dispatch_key("phiforge::int4_mm", "Meta"):
        torch.library.register_fake("phiforge::int4_mm")(
            lambda x, wt, sm, group_size: x.new_empty(x.shape[0], wt.shape[0]))
    if not torch._C._dispatch_has_kernel_for_dispatch_key("phiforge::bf16_mv", "Meta"):
        torch.library.register_fake("phiforge::bf16_mv")(lambda x, w: x.new_empty(x.shape[0], w.shape[0]))


def _op(name: str):
    if name not in _state:
        op = None
        try:
            if not hasattr(torch.ops.phiforge, name) and "built" not in _state:
                _state["built"] = False  # one build attempt per process, even if it raises
                _state["built"] = _build()
            if hasattr(torch.ops.phiforge, name):
                op = getattr(torch.ops.phiforge, name)
                _register_fake()
        except Exception as e:  # a broken toolchain must not break inference: fall back to pure torch
            warnings.warn(f"phiforge: C++ kernel {name} unavailable ({type(e).__name__}: {str(e)[:200]}); "
                          "using the slower pure-torch path")
        _state[name] = op
    return _state[name]


def int4_mm():
    """The int4 matmul op (x fp32 [M,K], wt uint8 [Np,K/2], sm fp16 [Np/4,K/G,8] from quant.tile_int4, G) or None."""
    return _op("int4_mm")


def bf16_mv():
    """The bf16 skinny matmul op (x bf16 [M,K] with M <= 4, w bf16 [N,K] contiguous, K % 8 == 0 -> bf16 [M,N])
    or None."""
    return _op("bf16_mv")
