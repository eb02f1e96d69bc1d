// What bounds lmserve's AMX-INT8 GEMM (lmserve/csrc/cpu/gguf_amx.cpp) on a given CPU: stand-alone C++ loops, not
// a test; figures go to docs/benchmarks.md. Linux x86-64 with AMX only:
//
//     g++ -O2 -std=c++17 -march=sapphirerapids benchmarks/amx_loops.cpp -o /tmp/amx_loops && /tmp/amx_loops
//
// 1. single tile instructions in a loop: tdpbssd / tdpbf16ps, a 1 KB tileloadd / tilestored, from buffers on
//    64-byte lines and 16 bytes off them (a std::vector's heap block is 16-byte aligned);
// 2. the GEMM's inner loop per 16 x 16 x 32 sub-block tile (row_tile's: zero, two loads, a dot four sub-blocks
//    ahead, the store, then the float epilogue of 16 rows), with and without its epilogue, the epilogue alone, and
//    the tile work beside an epilogue on data no tile writes (whether the two overlap);
// 3. what a bf16 GEMM on dequantized weights would run at: 2 x 2 tiles of tdpbf16ps accumulating over K, no
//    epilogue (the per-block-scale-free design that a different numeric contract would allow).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace {

void configure(int kb) {
  alignas(64) uint8_t c[64] = {};
  c[0] = 1;
  auto* colsb = reinterpret_cast<uint16_t*>(c + 16);
  uint8_t* rows = c + 48;
  for (int t = 0; t < 4; ++t) rows[t] = 16, colsb[t] = 64;
  for (int t = 4; t < 6; ++t) rows[t] = 16, colsb[t] = kb;
  for (int t = 6; t < 8; ++t) rows[t] = kb / 4, colsb[t] = 64;
  asm volatile("" ::: "memory");   // GCC does not see that ldtilecfg reads c
  _tile_loadconfig(c);
}

template <class F>
double best_ns(F f, double per) {
  double best = 1e30;
  for (int r = 0; r < 5; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best * 1e9 / per;
}

// row_tile's issue / drain, as gguf_amx.cpp has them (repeated so this file builds without torch or the package)
#define ISSUE(C, A, B)                       \
  do {                                       \
    _tile_zero(C);                           \
    _tile_loadd(A, ap + 512 * g, 32);        \
    _tile_loadd(B, bp + 512 * g, 64);        \
    _tile_dpbssd(C, A, B);                   \
  } while (0)
inline void issue(int t, const int8_t* ap, const int8_t* bp, int64_t g) {
  switch (t) {
    case 0: ISSUE(0, 4, 6); break;
    case 1: ISSUE(1, 5, 7); break;
    case 2: ISSUE(2, 4, 6); break;
    default: ISSUE(3, 5, 7); break;
  }
}
inline void drain(int t, int32_t* c) {
  switch (t) {
    case 0: _tile_stored(0, c, 64); break;
    case 1: _tile_stored(1, c, 64); break;
    case 2: _tile_stored(2, c, 64); break;
    default: _tile_stored(3, c, 64); break;
  }
}

// W: 1 tile work, 2 epilogue on the stored sums, 4 the MIN epilogue's second FMA, 8 epilogue on untouched data
template <int W>
__attribute__((noinline)) void row_tile(const int8_t* ap, const int8_t* bp, const float* s, const float* mn,
                                        const float* dx, const float* sx, int64_t ng, float* out) {
  alignas(64) int32_t c0[256], fixed[256];
  for (int i = 0; i < 256; ++i) c0[i] = fixed[i] = i;
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const int32_t* ec = (W & 8) ? fixed : c0;
  if (W & 1)
    for (int64_t g = 0; g < std::min<int64_t>(4, ng); ++g) issue(g & 3, ap, bp, g);
  for (int64_t g = 0; g < ng; ++g) {
    if (W & 1) {
      drain(g & 3, c0);
      if (g + 4 < ng) issue(g & 3, ap, bp, g + 4);
    }
    if (W & (2 | 8)) {
      const __m512 sv = _mm512_loadu_ps(s + 16 * g), mv = _mm512_loadu_ps(mn + 16 * g);
      for (int r = 0; r < 16; ++r) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_load_si512(ec + 16 * r));
        acc[r] = _mm512_fmadd_ps(v, _mm512_mul_ps(sv, _mm512_set1_ps(dx[r * ng + g])), acc[r]);
        if (W & 4) acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[r * ng + g]), acc[r]);
      }
    }
  }
  for (int r = 0; r < 16; ++r) _mm512_storeu_ps(out + 16 * r, acc[r]);
}

__attribute__((noinline)) void bf16_gemm(const uint16_t* A, const uint16_t* B, float* out, int64_t M, int64_t N,
                                         int64_t K) {
  const int64_t ks = K / 32;
  for (int64_t n = 0; n < N / 16; n += 2) {
    const uint16_t *b0 = B + n * ks * 512, *b1 = b0 + ks * 512;
    for (int64_t m = 0; m < M; m += 32) {
      _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
      const uint16_t *a0 = A + m * K, *a1 = a0 + 16 * K;   // activations in tile order, [m / 16][k / 32][16][32]
      for (int64_t k = 0; k < ks; ++k) {
        _tile_loadd(4, a0 + 512 * k, 64);
        _tile_loadd(6, b0 + 512 * k, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_loadd(7, b1 + 512 * k, 64);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(5, a1 + 512 * k, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, out + m * N + n * 16, N * 4);
      _tile_stored(1, out + m * N + n * 16 + 16, N * 4);
      _tile_stored(2, out + (m + 16) * N + n * 16, N * 4);
      _tile_stored(3, out + (m + 16) * N + n * 16 + 16, N * 4);
    }
  }
}

template <class T>
T* lines(int64_t n, int skew) {   // n elements starting `skew` bytes past a 64-byte line
  auto* p = static_cast<uint8_t*>(std::aligned_alloc(64, n * sizeof(T) + 64));
  std::memset(p, 1, n * sizeof(T) + 64);
  return reinterpret_cast<T*>(p + skew);
}

}  // namespace

int main() {
  if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
    std::printf("the kernel does not grant AMX tile state here\n");
    return 1;
  }
  constexpr int64_t kIters = 1 << 20;
  std::printf("1. single tile instructions, ns each\n");
  for (int skew : {0, 16}) {
    auto* buf = lines<int8_t>(8 * 1024, skew);
    configure(64);
    _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const double ld = best_ns([&] { for (int64_t i = 0; i < kIters; ++i) _tile_loadd(4, buf + 1024 * (i & 7), 64); }, kIters);
    const double st = best_ns([&] { for (int64_t i = 0; i < kIters; ++i) _tile_stored(0, buf + 1024 * (i & 7), 64); }, kIters);
    std::printf("   buffers %s: tileloadd 1 KB %.2f, tilestored 1 KB %.2f\n", skew ? "16 bytes off 64-byte lines" : "on 64-byte lines", ld, st);
  }
  const double d8 = best_ns([&] { for (int64_t i = 0; i < kIters / 4; ++i) { _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7); } }, kIters);
  const double d16 = best_ns([&] { for (int64_t i = 0; i < kIters / 4; ++i) { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); } }, kIters);
  std::printf("   tdpbssd (16 x 16 x 64 bytes) %.2f, tdpbf16ps %.2f (four sum tiles in turn)\n", d8, d16);

  std::printf("2. the int8 GEMM's row tile, ns per 16 x 16 x 32 sub-block tile (M 512, 64 column tiles, K 2048)\n");
  const int64_t K = 2048, ng = K / 32, M = 512, NT = 64;
  auto* sc = lines<float>(NT * ng * 16, 0);
  auto* dx = lines<float>(M * ng, 0);
  auto* out = lines<float>(NT * 256, 0);
  const double units = double(NT) * (M / 16) * ng;
  configure(32);
  for (int skew : {16, 0}) {
    auto* A = lines<int8_t>(M * K, skew);
    auto* B = lines<int8_t>(NT * 16 * K, skew);
    auto run = [&](auto fn) {
      return best_ns([&] {
        for (int64_t n = 0; n < NT; ++n)
          for (int64_t m0 = 0; m0 < M; m0 += 16)
            fn(A + m0 * K, B + n * 16 * K, sc + n * ng * 16, sc + n * ng * 16, dx + m0 * ng, dx + m0 * ng, ng, out + 256 * n);
      }, units);
    };
    std::printf("   panels %s: tiles + epilogue %.1f (with a minimum %.1f); tiles alone %.1f; epilogue alone %.1f; "
                "tiles beside an epilogue on other data %.1f\n", skew ? "16 bytes off 64-byte lines" : "on 64-byte lines",
                run(row_tile<3>), run(row_tile<7>), run(row_tile<1>), run(row_tile<2>), run(row_tile<9>));
  }

  std::printf("3. bf16 GEMM, 2 x 2 tiles accumulating over K (M 512, N 1024, K 2048)\n");
  {
    const int64_t N = 1024;
    auto* A = lines<uint16_t>(M * K, 0);
    auto* B = lines<uint16_t>(N * K, 0);
    auto* C = lines<float>(M * N, 0);
    configure(64);
    const double ns = best_ns([&] { bf16_gemm(A, B, C, M, N, K); }, double(M / 16) * (N / 16) * (K / 32));
    std::printf("   %.1f ns per 16 x 16 x 32 (the same multiply-adds as one int8 sub-block tile above)\n", ns);
  }
  _tile_release();
  return 0;
}
