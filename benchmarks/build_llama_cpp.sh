#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench from source, the peer of benchmarks/real_size.py and run_peers.py.
#
#   benchmarks/build_llama_cpp.sh [PEERS_DIR]        # default /work/peers (LMSERVE_PEERS_DIR)
#
# The source comes from PyPI (llama-cpp-python's sdist vendors llama.cpp; LLAMA_CPP_PYTHON_VERSION pins it), so
# it needs only pip, cmake, ninja and a C++ compiler. Native flags (-DGGML_NATIVE=ON, what a user building it
# gets); takes ~30-60 min on 2 busy cores. Leaves links PEERS_DIR/llama-server, PEERS_DIR/llama-bench and
# PEERS_DIR/LLAMA_CPP_VERSION (the llama.cpp commit, from the sdist's changelog: the sdist has no .git).
# LLAMA_CPP_CMAKE_ARGS adds cmake options after the defaults. On an Intel Sapphire Rapids VM the native build's AMX
# kernels died with SIGILL (tileloadd in ggml_backend_amx_mul_mat, llama-bench on any GGUF); what ran there:
#   LLAMA_CPP_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON
#     -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON"
set -euo pipefail
PEERS_DIR=${1:-${LMSERVE_PEERS_DIR:-/work/peers}}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
PIP=${PIP:-pip}
mkdir -p "$PEERS_DIR/src"
cd "$PEERS_DIR/src"
[ -f "llama_cpp_python-$VERSION.tar.gz" ] ||
    "$PIP" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d .
tar xzf "llama_cpp_python-$VERSION.tar.gz"
SRC="$PEERS_DIR/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
COMMIT=$(grep -m1 -o 'llama.cpp@[0-9a-f]*' "llama_cpp_python-$VERSION/CHANGELOG.md" | cut -d@ -f2 || echo unknown)
nice -n 10 cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF ${LLAMA_CPP_CMAKE_ARGS:-}
nice -n 10 cmake --build "$SRC/build" -j2 --target llama-bench llama-server
# links, not copies: the binaries find llama.cpp's shared libraries (libllama, libggml*) next to themselves
ln -sf "$SRC/build/bin/llama-server" "$SRC/build/bin/llama-bench" "$PEERS_DIR/"
echo "$COMMIT (llama-cpp-python $VERSION sdist, GGML_NATIVE=ON ${LLAMA_CPP_CMAKE_ARGS:-}, Release, built $(date -u +%F))" \
    > "$PEERS_DIR/LLAMA_CPP_VERSION"
cat "$PEERS_DIR/LLAMA_CPP_VERSION"
