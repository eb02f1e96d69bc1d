// The repacked int8 GEMMs (gguf_q4_kx8.cpp, gguf_q6_kx8.cpp, gguf_q4_0x8.cpp, gguf_q8_0x8.cpp) on one thread,
// without Python, torch's thread pool or a rebuild of the whole library: a kernel change is timed in seconds. Random
// file blocks (every fp16 scale 2^-7) repacked by the library's own pack, random int8 activations; weights from
// cache unless N x K is large. Not a test; figures go to docs/benchmarks.md.
//   TI=$(python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))")
//   S=lmserve/csrc/cpu; SRC="$S/gguf_q4_kx8.cpp $S/gguf_q6_kx8.cpp $S/gguf_q4_0x8.cpp $S/gguf_q8_0x8.cpp"
//   F="-O3 -ffp-contract=off -mavx2 -mfma -mf16c -std=c++17 -fopenmp"
//   g++ $F -I$S -I$TI benchmarks/x8_tile_bench.cpp $SRC -o /tmp/x8_tile_bench
//   /tmp/x8_tile_bench Q4_K|Q6_K|Q4_0|Q8_0 M N K [reps]
// Environment: AVX2=1 the AVX2 tiles instead of AVX512-VNNI; SMALL_PAGES=1 weights on 4 KB pages (default: 2 MB,
// as a server maps them); THREADS=n n OpenMP threads on column ranges.
// The checksum is the same for every build of the same arithmetic: a change that moves it changed the bits.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <sys/mman.h>
#include "gguf_kernels.h"

namespace {
using Kernel = void (*)(const gguf::DotArgs&, int64_t, int64_t);
using Pack = void (*)(const uint8_t*, int64_t, int64_t, int64_t, uint8_t*);
struct Type {
  const char* name;
  int elems, bytes, scale_at[2];   // block size, block bytes, where its fp16 scales lie (-1: none)
  Pack pack;
  Kernel avx2, vnni;
};
const Type kTypes[] = {
    {"Q4_K", 256, 144, {0, 2}, gguf::q4_kx8_pack, gguf::q4_kx8_avx2, gguf::q4_kx8_avx512vnni},
    {"Q6_K", 256, 210, {208, -1}, gguf::q6_kx8_pack, gguf::q6_kx8_avx2, gguf::q6_kx8_avx512vnni},
    {"Q4_0", 32, 18, {0, -1}, gguf::q4_0x8_pack, gguf::q4_0x8_avx2, gguf::q4_0x8_avx512vnni},
    {"Q8_0", 32, 34, {0, -1}, gguf::q8_0x8_pack, gguf::q8_0x8_avx2, gguf::q8_0x8_avx512vnni},
};
}  // namespace

int main(int argc, char** argv) {
  const Type* t = nullptr;
  for (const Type& c : kTypes)
    if (argc > 1 && std::string(argv[1]) == c.name) t = &c;
  if (argc < 5 || t == nullptr) {
    std::fprintf(stderr, "usage: %s Q4_K|Q6_K|Q4_0|Q8_0 M N K [reps]\n", argv[0]);
    return 2;
  }
  const int64_t M = std::atol(argv[2]), N = std::atol(argv[3]), K = std::atol(argv[4]);
  const int reps = argc > 5 ? std::atoi(argv[5]) : 20;
  const int64_t nb = K / t->elems, ws = nb * t->bytes;
  // the weights on 2 MB pages, as a server maps them (THP_MEM_ALLOC_ENABLE): 4 KB pages add TLB misses to a stream
  const size_t wbytes = (N * ws + (2 << 20) - 1) / (2 << 20) * (2 << 20);
  uint8_t* w = static_cast<uint8_t*>(std::aligned_alloc(2 << 20, wbytes));
  if (std::getenv("SMALL_PAGES") == nullptr) madvise(w, wbytes, MADV_HUGEPAGE);
  std::vector<uint8_t> file(N * ws);
  std::srand(1);
  for (auto& b : file) b = static_cast<uint8_t>(std::rand());
  for (int64_t i = 0; i < N * nb; ++i)
    for (int at : t->scale_at)
      if (at >= 0) file[i * t->bytes + at] = 0, file[i * t->bytes + at + 1] = 0x20;   // fp16 2^-7
  for (int64_t gr = 0; gr < N / 8; ++gr) t->pack(file.data(), ws, gr, nb, w);
  gguf::Act a;   // what quantize_act makes of some float activations: q, a scale per 32 and the sums the tiles use
  a.q.resize(M * K);
  for (auto& v : a.q) v = static_cast<int8_t>(std::rand() % 255 - 127);
  a.dx.assign(M * K / 32, 0.01f);
  a.sx.resize(M * K / 32), a.qsum.resize(M * K / 32), a.hs.resize(M * K / 16), a.ls.resize(M * K / 4);
  for (int64_t i = 0; i < M * K / 4; ++i)
    a.ls[i] = a.q[4 * i] + a.q[4 * i + 1] + a.q[4 * i + 2] + a.q[4 * i + 3];
  for (int64_t g = 0; g < M * K / 32; ++g) gguf::group_sums(a, g);
  std::vector<float> out(M * N);
  gguf::DotArgs p{};
  p.int8 = true, p.out = out.data(), p.a = &a, p.w = w, p.ws = ws, p.M = M, p.N = N, p.K = K;
  const bool avx2 = std::getenv("AVX2") != nullptr;
  const Kernel run = avx2 ? t->avx2 : t->vnni;
  const int threads = std::getenv("THREADS") ? std::atoi(std::getenv("THREADS")) : 1;
  double best = 1e9;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    if (threads == 1) {
      run(p, 0, N);
    } else {   // columns split as the library splits them: contiguous ranges, whole chunks of 16
#pragma omp parallel for num_threads(threads)
      for (int th = 0; th < threads; ++th) run(p, N / 16 * th / threads * 16, N / 16 * (th + 1) / threads * 16);
    }
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  double sum = 0;
  for (float v : out) sum += v;
  std::free(w);
  std::printf("%s %s %dt M=%ld N=%ld K=%ld: %.3f ms, %.0f GOP/s (checksum %.9g)\n", t->name,
              avx2 ? "avx2" : "avx512vnni", threads,
              static_cast<long>(M), static_cast<long>(N), static_cast<long>(K), best * 1e3,
              2.0 * M * N * K / best / 1e9, sum);
}
