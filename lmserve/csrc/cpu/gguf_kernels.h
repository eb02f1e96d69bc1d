// Internal interface of the GGUF matmul kernels (cpu_isa.cpp: the ISA level; gguf_matmul.cpp: entry points,
// scalar reference, the scalar build's GEMM tiles; gguf_dot_avx2.cpp: AVX2 float dots and dequantization;
// gguf_gemm_avx2.cpp: AVX2 int8 GEMM for every M and the float tile GEMM; gguf_gemm_avx512.cpp: that int8 GEMM on
// AVX512-VNNI, chosen at run time (both run the i-quant grid types through gguf_grid_lanes.h); gguf_q4_0x8.cpp, gguf_q4_kx8.cpp, gguf_q6_kx8.cpp, gguf_q5_0x8.cpp,
// gguf_q3_kx8.cpp, gguf_q2_kx8.cpp, gguf_iq4_xsx8.cpp, gguf_q8_0x8.cpp, gguf_mxfp4x8.cpp: the int8 GEMM on Q4_0 /
// Q4_1 / Q4_K / Q5_K / Q6_K / Q5_0 / Q3_K / Q2_K / IQ4_XS / Q8_0 / Q5_1 / MXFP4 / IQ4_NL repacked in 8-row groups;
// gguf_amx.cpp: that GEMM on AMX-INT8
// tiles for prefill-sized calls, chosen at run time, with gguf_amx_panels.cpp (gguf_amx.h); gguf_bf16_avx512.cpp: F16 / BF16 weights x bf16 activations on
// AVX512-BF16).
#pragma once
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace gguf {

// Storage on 64-byte lines: an AMX tile load or store of rows that straddle two cache lines is several times
// slower (measured on Sapphire Rapids: a 1 KB tileloadd 15.9 ns vs 2.5 ns aligned, tilestored 10.6 vs 4.5), and a
// std::vector's heap block is 16-byte aligned
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <class U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};

// ISA levels, as lmserve/ops/cpu_isa.py LEVELS (in that order)
enum Isa { ISA_SCALAR = 0, ISA_AVX2, ISA_AVXVNNI, ISA_AVX512, ISA_AVX512VNNI, ISA_AMX };
// cpu_isa.cpp: the best level this CPU runs; the level the kernels run at (never above it); whether F16 / BF16
// parts of non-exact calls run on AVX512-BF16
int cpu_best_isa();
int isa_level();
bool cpu_splits_512();   // AMD Zen 4: 512-bit operations run as two 256-bit halves
bool bf16_dot();

// Activations quantized for the int8 path: per row, per group of 32, q = round(x / dx), dx = amax / 127.
struct Act {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> dx;   // [M, K / 32]
  std::vector<float> sx;   // [M, K / 32]: dx * sum(q) over the group (the min term of unsigned types)
  std::vector<int32_t> ls; // [M, K / 32, 8]: sums of q over values 4l..4l+3 of each group (maddubs+madd lanes)
  std::vector<int32_t> qsum; // [M, K / 32]: sum of q over the group (Q4_0X8's offset term)
  // [M, K / 16]: -32 x the sum of q over each 16 values, Q6_KX8's offset term: its tiles broadcast it from memory
  // (measured +7-16% at 16-512 rows over summing the lane sums and broadcasting from a register per row)
  std::vector<int32_t> hs;
  std::vector<uint16_t> xb;  // [M, K]: x rounded to bfloat16 (F16 / BF16 weights' non-exact path, act_bf16)
  // [M / 16][K / 32][16 rows][32]: q of the first M - M % 16 rows in AMX tile order (amx_pack_act, where AMX runs)
  std::vector<int8_t, Aligned64<int8_t>> qtiles;
};
void quantize_act(Act& a, const float* x, int64_t M, int64_t K);
// group g's sums from its lane sums a.ls and scale a.dx: qsum, hs, sx (every quantizer's last step)
inline void group_sums(Act& a, int64_t g) {
  const int32_t* l = a.ls.data() + g * 8;
  const int32_t lo = l[0] + l[1] + l[2] + l[3], hi = l[4] + l[5] + l[6] + l[7];
  a.qsum[g] = lo + hi;
  a.hs[g * 2] = -32 * lo;
  a.hs[g * 2 + 1] = -32 * hi;
  a.sx[g] = a.dx[g] * static_cast<float>(lo + hi);
}

// Matmul of all M rows for outputs n0..n1 (out[m, n], row stride N). w: row n at w + n * ws.
// int8: a holds the quantized activations; else x (float32 [M, K]) is read.
struct DotArgs {
  int qt;
  bool int8;
  float* out;
  const float* x;
  const Act* a;
  const uint8_t* w;
  int64_t ws, M, N, K;
  int64_t m_begin = 0;   // rows [m_begin, M) (x8 tiles: the AMX GEMM leaves the last M % 16 rows to them)
};
void dot_scalar(const DotArgs& p, int64_t n0, int64_t n1);
// Q4_0X8 (gguf_q4_0x8.cpp), Q4_KX8 (gguf_q4_kx8.cpp): int8 activations only; w / ws as for the source type, N a
// multiple of 8. *_rows: row n in file order, as float32
void q4_0x8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q4_0x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q4_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q4_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q6_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q6_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q5_0x8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q5_0x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q4_1x8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q4_1x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
// group gr (rows 8 gr .. 8 gr + 7) of a file-layout matrix src -> its repacked bytes in dst (same offsets)
void q4_0x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q4_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q6_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q5_0x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q4_1x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q3_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q3_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q3_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q2_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q2_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q2_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void iq4_xsx8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void iq4_xsx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void iq4_xsx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q5_kx8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q5_kx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q5_kx8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q8_0x8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q8_0x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q8_0x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void q5_1x8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void q5_1x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void q5_1x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void mxfp4x8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void mxfp4x8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
void mxfp4x8_pack(const uint8_t* src, int64_t ws, int64_t gr, int64_t nb, uint8_t* dst);
void iq4_nlx8_scalar(const DotArgs& p, int64_t n0, int64_t n1);
void iq4_nlx8_rows(const uint8_t* w, int64_t ws, int64_t n, int64_t nb, float* out);
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#define LMSERVE_GGUF_AVX2 1
void dot_float_avx2(const DotArgs& p, int64_t n0, int64_t n1);    // float activations, decode sizes
void float_gemm_avx2(const DotArgs& p, int64_t n0, int64_t n1);   // float activations, any M, same per-row result
void int8_avx2(const DotArgs& p, int64_t n0, int64_t n1);         // int8 activations, any M
void int8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);   // the same, bit for bit, on AVX512-VNNI
void q4_0x8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q4_0x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);   // bit for bit as q4_0x8_avx2
void q4_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q4_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void q6_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q6_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void q5_0x8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q5_0x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void q4_1x8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q4_1x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void q3_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q3_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void q2_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q2_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void iq4_xsx8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void iq4_xsx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void q5_kx8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q5_kx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void q8_0x8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q8_0x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void q5_1x8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void q5_1x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void mxfp4x8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void mxfp4x8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void iq4_nlx8_avx2(const DotArgs& p, int64_t n0, int64_t n1);
void iq4_nlx8_avx512vnni(const DotArgs& p, int64_t n0, int64_t n1);
void dequant_avx2(int qt, const uint8_t* row, int64_t nb, float* out);   // nb blocks -> float32, as the reference
void quantize_group_avx2(Act& a, const float* x, int64_t g);   // quantize_act's group g, the same values
// F16 / BF16 weights x bf16 activations on AVX512-BF16 (gguf_bf16_avx512.cpp); act_bf16 fills a.xb
void act_bf16(Act& a, const float* x, int64_t M, int64_t K);
void bf16_avx512(const DotArgs& p, int64_t n0, int64_t n1);
// the 8 rows' float sub-block scales and mins of a Q4_KX8 / Q5_KX8 group super-block (gguf_q4_kx8.cpp)
void q4_kx8_scales(const uint8_t* group_block, float (*sc)[8], float (*mn)[8]);
// sub-block s of two Q3_KX8 group super-blocks (groups a, b) for the AMX panels (gguf_q3_kx8.cpp): its values - 4 in
// the tile layout (half A: 4 rows x 16 columns x 4 bytes, then half B) and the halves' integer scales [2][16]
void q3_kx8_amx_sub(const uint8_t* ba, const uint8_t* bb, int s, int8_t* tiles, int32_t* isc);
// AMX-INT8 GEMM on a repacked part (gguf_amx.cpp): rows [0, M - M % 16) on AMX tiles, the rest on `rest` (the
// part's AVX512-VNNI tiles), bit for bit as those; amx_x8_takes: whether it runs a call of M rows of type qt
bool amx_x8_takes(int qt, int64_t M);
void amx_pack_act(Act& a, int64_t M, int64_t K);   // a.qtiles from a.q, once per call for every thread
void amx_x8(const DotArgs& p, int64_t n0, int64_t n1, void (*rest)(const DotArgs&, int64_t, int64_t));
#endif

}  // namespace gguf
