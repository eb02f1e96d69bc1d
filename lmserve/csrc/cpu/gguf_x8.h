// Shared by the kernels on weights repacked in groups of 8 rows (gguf_*x8.cpp): a lane of a register is an output
// column, so a block's integer dot ends in one lane and is scaled once ("reduce, then scale"). Only included by
// those files.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include "gguf_blocks.h"
#include "gguf_kernels.h"
#ifdef LMSERVE_GGUF_AVX2
#include <immintrin.h>
#endif

namespace gguf {
namespace x8 {

inline int32_t load_i32(const int8_t* p) {   // 4 activation bytes, broadcast by the caller
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// sums of row m's activations over the two halves of sub-block g (from the 4-value lane sums)
inline void half_sums(const Act& a, int64_t g, int32_t& sa, int32_t& sb) {
  const int32_t* l = a.ls.data() + g * 8;
  sa = l[0] + l[1] + l[2] + l[3];
  sb = l[4] + l[5] + l[6] + l[7];
}

// row m's outputs of columns [8 gr, 8 gr + 8 NG) from `lanes`; columns outside [n0, n1) belong to another thread
// (a column split may cut a group: both threads compute it, each stores its own lanes)
inline void store(const DotArgs& p, int64_t m, int64_t gr, int ncols, const float* lanes, int64_t n0, int64_t n1) {
  for (int c = 0; c < ncols; ++c) {
    const int64_t n = gr * 8 + c;
    if (n >= n0 && n < n1) p.out[m * p.N + n] = lanes[c];
  }
}

// Tile::kMaxRows where a tile declares it, else 4
template <class T, class = void>
struct max_rows { static constexpr int value = 4; };
template <class T>
struct max_rows<T, std::void_t<decltype(T::kMaxRows)>> { static constexpr int value = T::kMaxRows; };

// Software prefetch in the tile that streams a chunk's weights from memory in a decode-sized call (< kStreamRows
// rows, one 64-row block: its first row tile; a decode step reads every weight once, from DRAM). A tile of NG
// groups reads NG streams 8 * ws bytes apart, a block of each at a time, and asks for each stream's lines kBytes
// ahead. The hardware prefetchers alone left the 1-4 row calls of the 4-bit types well below the read bandwidth
// while their unpacking kept the core busy (Q4_K 1 row at ~70% of it on a Sapphire Rapids VM); with these
// prefetches 1-row calls of Q4_0 / Q4_K / Q5_K / IQ4_XS ran 1.2-1.8x faster, 4-row calls of the AVX2 tiles up to
// 1.8x (docs/benchmarks.md). Same operations, same bits. Larger calls are compute-bound and re-read each chunk from
// cache by 8+ row tiles: they do not prefetch. ON is a template argument (blocked() picks the instantiation per
// tile), not a run-time test in the loops: that test alone cost Q6_K's 64-row calls 13%. The lines go to L2
// (prefetcht1), not L1: an L1 prefetch holds one of the core's few L1 fill buffers until its line arrives, which
// capped the lines in flight per core; to L2, 1-row calls ran another 1.1-1.3x (AVX2 tiles) and a 1B Q4_K_M
// decode step 1.14x (AVX2) / 1.08x (AVX512-VNNI) on a Sapphire Rapids VM (docs/benchmarks.md). The tile's own
// loads then find them in L2, whose latency its unpacking covers. The distance is at least the tile's NG groups (a
// chunk): the groups lie one after another, so with 8 * ws > kBytes (K >= 8192 for 4-bit types) stream a's line
// kBytes ahead fell in group b, behind stream b's reads, and half the streams went without; a chunk ahead, each
// stream asks for its own place in the next chunk. Measured (benchmarks/x8_tile_bench.cpp, Zen 4, AVX512-VNNI,
// weights from DRAM): K 8192 1 row Q4_K 1.7-1.9x, Q6_K 1.5x, Q4_0 2.3x, 16 rows 1.1-1.2x; K 14336 16 rows 1.16x;
// K 2048 unchanged.
constexpr int64_t kStreamRows = 64;
template <bool ON>
struct Ahead {
  static constexpr int64_t kBytes = 32 * 1024;
  const uint8_t *a, *b_;
  Ahead(const DotArgs& p, const uint8_t* group, int ng)
      : a(group + std::max<int64_t>(kBytes, ng * 8 * p.ws)), b_(ng == 2 ? a + 8 * p.ws : nullptr) {}
  // lines i * n .. i * n + n - 1 of block b (`bytes` long) of each of the tile's groups: a tile calls it at each
  // of its steps through a block, so a block is asked for early in its own reading (front-loaded; spreading the
  // lines evenly over the steps measured slower for Q4_K)
  inline void lines(int64_t b, int64_t bytes, int i, int n) const {
    if constexpr (ON) {
      for (int64_t k = i * n; k < i * n + n && 64 * k < bytes; ++k) {
        __builtin_prefetch(a + b * bytes + 64 * k, 0, 2);
        if (b_ != nullptr) __builtin_prefetch(b_ + b * bytes + 64 * k, 0, 2);
      }
    }
  }
};

// Tile::run<RM, PF>: PF for the first row tile of a chunk in a decode-sized call (then pf turns false)
template <class Tile, int RM>
inline void run_tile(const DotArgs& p, int64_t m, int64_t gc, int64_t ng, int64_t n0, int64_t n1,
                     typename Tile::Ctx& ctx, bool& pf) {
  if (pf) Tile::template run<RM, true>(p, m, gc, ng, n0, n1, ctx);
  else Tile::template run<RM, false>(p, m, gc, ng, n0, n1, ctx);
  pf = false;
}

// The blocking every ISA shares: blocks of 64 activation rows x chunks of Tile::kGroups groups (16 columns on
// AVX512, 8 on AVX2; <= 74 KB of W at K = 8192, re-read from cache by each row tile) x row tiles of 8 (tiles with
// kMaxRows = 8: the AVX512-VNNI ones whose 32 registers hold 8 rows' sums, so each weight load and unpack serves
// twice the rows; measured +2-24% on Q4_0/Q4_1/Q5_0/Q5_1/Q4_K/Q5_K/IQ4_XS/Q8_0, slower on Q6_K/Q3_K/Q2_K, whose
// unpacking needs more registers), 4, 2, 1. Tile::prepare(p, gr, ng, ctx) runs once per chunk (K-quants decode
// their scales there). Tiles decide only which outputs share loads, never an output's operations.
template <class Tile>
void blocked(const DotArgs& p, int64_t n0, int64_t n1) {
  constexpr int64_t MB = 64;
  const int64_t g0 = n0 / 8, g1 = (n1 + 7) / 8;
  typename Tile::Ctx ctx;
  for (int64_t mb = p.m_begin; mb < p.M; mb += MB) {
    const int64_t me = std::min(p.M, mb + MB);
    for (int64_t gc = g0; gc < g1; gc += Tile::kGroups) {
      const int64_t ng = std::min<int64_t>(Tile::kGroups, g1 - gc);
      Tile::prepare(p, gc, ng, ctx);
      int64_t m = mb;
      bool pf = p.M - p.m_begin < kStreamRows;
      if constexpr (max_rows<Tile>::value >= 8)
        for (; m + 8 <= me; m += 8) run_tile<Tile, 8>(p, m, gc, ng, n0, n1, ctx, pf);
      for (; m + 4 <= me; m += 4) run_tile<Tile, 4>(p, m, gc, ng, n0, n1, ctx, pf);
      if (m + 2 <= me) { run_tile<Tile, 2>(p, m, gc, ng, n0, n1, ctx, pf); m += 2; }
      if (m < me) run_tile<Tile, 1>(p, m, gc, ng, n0, n1, ctx, pf);
    }
  }
}

struct NoCtx {};

// Tile of a layout with no per-chunk state: F::template tile<RM, NG, PF>(p, m, gr, n0, n1) computes rows m..m+RM-1 of
// NG groups from gr (AVX2: Groups = 1; AVX512: Groups = 2, and NG = 1 for a chunk's odd last group)
template <class F, int Groups, int MaxRows = 4>
struct PlainTile {
  static constexpr int kGroups = Groups, kMaxRows = MaxRows;
  using Ctx = NoCtx;
  static void prepare(const DotArgs&, int64_t, int64_t, Ctx&) {}
  template <int RM, bool PF>
  static void run(const DotArgs& p, int64_t m, int64_t gr, int64_t ng, int64_t n0, int64_t n1, Ctx&) {
    if constexpr (Groups == 2) {
      if (ng == 2) return F::template tile<RM, 2, PF>(p, m, gr, n0, n1);
    }
    F::template tile<RM, 1, PF>(p, m, gr, n0, n1);
  }
};

// row n of a repacked matrix in file order, as float32: each block gathered back to its file bytes (Gather: the
// layout's inverse for one block) and dequantized by the reference
template <int QT, class Gather>
void file_rows(Gather gather, const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out) {
  uint8_t blk[kBlockBytes[QT]];
  for (int64_t b = 0; b < nb; ++b) {
    gather(w, ws, n, b, blk);
    dequant_block(QT, blk, out + b * kBlockElems[QT]);
  }
}

#ifdef LMSERVE_GGUF_AVX2
// Keeps an integer running sum in its register. Integer adds reassociate freely, and GCC -O3 rewrote each unrolled
// chain `s += maddubs(..)` as "every product first, then a tree of adds": 64 products of a 4-row Q4_K tile spilled
// to the stack and read back. An empty asm that "changes" the sum after each add keeps the chain as written.
inline void pin(__m256i& v) { __asm__("" : "+x"(v)); }

// an AVX2 tile's accumulators (one 8-lane register per row, lane c = column 8 gr + c) to the output
template <int RM>
inline void store_tile(const DotArgs& p, int64_t m0, int64_t gr, const __m256 (&acc)[RM], int64_t n0, int64_t n1) {
  if (gr * 8 >= n0 && gr * 8 + 8 <= n1) {   // every column this thread's: one store per row
    for (int m = 0; m < RM; ++m) _mm256_storeu_ps(p.out + (m0 + m) * p.N + gr * 8, acc[m]);
    return;
  }
  for (int m = 0; m < RM; ++m) {
    alignas(32) float o[8];
    _mm256_store_ps(o, acc[m]);
    store(p, m0 + m, gr, 8, o, n0, n1);
  }
}
#endif

}  // namespace x8
}  // namespace gguf
