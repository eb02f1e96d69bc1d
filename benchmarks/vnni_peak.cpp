// The AVX512-VNNI integer peak of this CPU: independent vpdpbusd chains on registers, one per OpenMP thread, no
// memory traffic. A ceiling for the int8 GEMM's GOP/s (1 vpdpbusd on 64 bytes = 128 ops). Not a test.
//   g++ -O2 -mavx512f -mavx512bw -mavx512vnni -fopenmp benchmarks/vnni_peak.cpp -o /tmp/vnni_peak
//   OMP_NUM_THREADS=1 /tmp/vnni_peak; OMP_NUM_THREADS=2 /tmp/vnni_peak
#include <immintrin.h>
#include <omp.h>
#include <chrono>
#include <cstdio>

int main() {
  constexpr int kChains = 10;      // > latency x throughput, so the chains never wait on one another
  const long iters = 25000000;
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    long sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
      const __m512i a = _mm512_set1_epi8(static_cast<char>(1 + omp_get_thread_num())), b = _mm512_set1_epi8(2);
      __m512i c[kChains];
      // distinct starting values: identical chains would be merged into one by the compiler
      for (int i = 0; i < kChains; ++i) c[i] = _mm512_set1_epi32(i);
      for (long it = 0; it < iters; ++it)
#pragma GCC unroll 10
        for (int i = 0; i < kChains; ++i) c[i] = _mm512_dpbusd_epi32(c[i], a, b);
      __m512i s = c[0];
      for (int i = 1; i < kChains; ++i) s = _mm512_add_epi32(s, c[i]);
      sink += _mm512_reduce_add_epi32(s) & 1;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double gops = 128.0 * kChains * iters * omp_get_max_threads() / dt / 1e9;
    if (gops > best) best = gops;
    std::printf("%d thread(s): %.0f GOP/s (%ld)\n", omp_get_max_threads(), gops, sink);
  }
  std::printf("best: %.0f GOP/s\n", best);
}
