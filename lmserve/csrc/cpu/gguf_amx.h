// The AMX GEMM's weight panels (gguf_amx.cpp): 16 columns of a repacked matrix unpacked into the tile layout, and
// the per-type unpackers and epilogue kinds (gguf_amx_panels.cpp). Only included by those two files.
#pragma once
#include <cstdint>
#include <vector>
#include "gguf_kernels.h"

namespace gguf {
namespace amx {

// the epilogue: none, a minimum, an integer scale, two halves' scales, and those with the halves' integer offsets
// times their activation sums (Q2_K)
enum Epi { PLAIN, MIN, ISC, HALVES, HALVES_MIN };

// 16 columns of a call's weights, unpacked: per 32-value sub-block g, b[g]: 8 rows x 64 bytes (row k4, column c:
// values 4k4..4k4+3); s, mn: [g][16] floats; isc: [g][16] (ISC) or [g][2][16] (HALVES) int32; mo: [g][2][16] the
// halves' integer offsets / 32 (HALVES_MIN)
struct Panel {
  std::vector<int8_t, Aligned64<int8_t>> b;   // 64-byte lines: tile loads (gguf_kernels.h)
  std::vector<float> s, mn, mo;
  std::vector<int32_t> isc;
  void resize(int64_t nsub) {
    b.resize(nsub * 512);
    s.resize(nsub * 16);
    mn.resize(nsub * 16);
    mo.resize(nsub * 32);
    isc.resize(nsub * 32);
  }
};

// how a type's panels are made and its sums scaled. min_rows: the calls AMX takes, the fewest rows at which it beat
// the AVX512-VNNI tiles on a Sapphire Rapids VM, weights cache-resident, twice (docs/benchmarks.md): at 16 rows Q3_K
// 1.27-1.38x, Q5_0 1.20x, IQ4_XS 1.09-1.12x, the rest 0.81-1.02x (the panels are unpacked for one row tile); at 32
// Q5_K / Q6_K / Q2_K / Q4_1 1.07-1.15x; Q4_K level at 32, 1.09-1.13x at 48
struct Kind {
  void (*unpack)(const DotArgs&, int64_t, Panel&);
  Epi epi;
  int64_t min_rows;
};
const Kind* kind(int qt);   // nullptr: no AMX unpacker for this type

}  // namespace amx
}  // namespace gguf
