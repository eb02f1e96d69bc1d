// The repacked Q4_K int8 GEMM (gguf_q4_kx8.cpp) on one thread, without Python, torch's thread pool or a rebuild of
// the whole library: a kernel change is timed in seconds. Random repacked bytes (every fp16 scale 2^-7), random
// int8 activations; weights from cache unless N x K is large. Not a test; figures go to docs/benchmarks.md.
//   TI=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
//   g++ -O3 -ffp-contract=off -mavx2 -mfma -mf16c -std=c++17 -Ilmserve/csrc/cpu -I$TI \
//       benchmarks/x8_tile_bench.cpp lmserve/csrc/cpu/gguf_q4_kx8.cpp -o /tmp/x8_tile_bench
//   /tmp/x8_tile_bench M N K [reps]          (AVX2=1 in the environment: the AVX2 tiles instead of AVX512-VNNI)
// The checksum is the same for every build of the same arithmetic: a change that moves it changed the bits.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "gguf_kernels.h"

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s M N K [reps]\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atol(argv[1]), N = std::atol(argv[2]), K = std::atol(argv[3]);
  const int reps = argc > 4 ? std::atoi(argv[4]) : 20;
  const int64_t ws = K / 256 * 144;   // a Q4_K row's bytes; the layout keeps them (8 rows x 144 per super-block)
  std::vector<uint8_t> w(N * ws);
  std::srand(1);
  for (auto& b : w) b = static_cast<uint8_t>(std::rand());
  for (int64_t gr = 0; gr < N / 8; ++gr)
    for (int64_t b = 0; b < K / 256; ++b) {   // d and dmin of the 8 rows: fp16 0x2000 = 2^-7, never NaN or Inf
      uint8_t* g = w.data() + gr * 8 * ws + b * 1152;
      for (int i = 0; i < 16; ++i) g[2 * i] = 0, g[2 * i + 1] = 0x20;
    }
  gguf::Act a;
  a.q.resize(M * K);
  a.dx.assign(M * K / 32, 0.01f);
  a.sx.assign(M * K / 32, 0.3f);
  for (auto& v : a.q) v = static_cast<int8_t>(std::rand() % 255 - 127);
  std::vector<float> out(M * N);
  gguf::DotArgs p{};
  p.int8 = true, p.out = out.data(), p.a = &a, p.w = w.data(), p.ws = ws, p.M = M, p.N = N, p.K = K;
  const bool avx2 = std::getenv("AVX2") != nullptr;
  double best = 1e9;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    if (avx2) gguf::q4_kx8_avx2(p, 0, N);
    else gguf::q4_kx8_avx512vnni(p, 0, N);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  double sum = 0;
  for (float v : out) sum += v;
  std::printf("%s M=%ld N=%ld K=%ld: %.3f ms, %.0f GOP/s (checksum %.9g)\n", avx2 ? "avx2" : "avx512vnni",
              static_cast<long>(M), static_cast<long>(N), static_cast<long>(K), best * 1e3,
              2.0 * M * N * K / best / 1e9, sum);
}
