// GGUF quantized blocks read in place (layouts: gguf-py quants.py, llama.cpp ggml-quants.c; the torch reference is
// lmserve/ops/gguf_blocks.py). Type ids follow lmserve/ops/linear.py QTYPES.
//
// Every supported type decodes to one form: int8 values q, a float scale and a float offset per 16 values (the
// offset is one per 32 except in Q2_K),
//   w[e] = q[e] * scale[e / 16] + min[e / 16]
// computed in float32 exactly as the reference dequantizer does (two roundings: the build uses -ffp-contract=off),
// so the float path multiplies by the reference's weights bit for bit. The int8 path uses q directly:
//   sum_e w[e] x[e] ~ sum_16 scale * dx * (sum q qx) + sum_32 min * dx * (sum qx).
#pragma once
#include <c10/util/Half.h>
#include <cstdint>
#include <cstring>
#ifdef __F16C__
#include <immintrin.h>
#endif

namespace gguf {

// F16 / BF16: 16-bit float matrices (F16 / BF16 GGUF files, 16-bit safetensors) read in place, as blocks of 32
// values with no scale; they have no int8 form: every path multiplies them with float activations (kFloat16)
// IQ4_NL: IQ4_XS's levels in Q4_0's 32-value block (d, 16 index bytes); llama.cpp writes it for the matrices of
// IQ4_XS files whose rows are not whole 256-value blocks
// IQ2_XXS / IQ2_XS / IQ2_S / IQ3_XXS / IQ3_S: signed grid magnitudes (gguf_iq2_grids.h, gguf_iq3_grids.h), a
// scale per 32 (IQ2_XS, IQ2_S: per 16); IQ1_S / IQ1_M: grid values -1, 0, 1 plus an offset of +-1/8 per 32 / 8
// values, held as q = 8 (grid + offset) (gguf_iq1_grids.h), a scale per 32 / 16 (lmserve/ops/gguf_iq.py)
// MXFP4: OCP microscaling FP4 (gpt-oss's experts, llama-quantize's MXFP4_MOE files): an E8M0 exponent byte and 16
// index bytes per 32 values; the E2M1 values doubled are integers (kMXFP4), so the scale is 2^(e - 128)
enum QType { Q4_0 = 0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q3_K, IQ4_XS, Q2_K, F16, BF16, IQ4_NL,
             IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M, MXFP4, NUM_QTYPES };
// Q4_0 / Q4_K / Q6_K / Q5_0 / Q4_1 / Q3_K / Q2_K / IQ4_XS / Q5_K / Q8_0 / Q5_1 / MXFP4 / IQ4_NL in 8-row groups
// (gguf_q4_0x8.cpp also Q4_1, gguf_q4_kx8.cpp also Q5_K, gguf_q6_kx8.cpp, gguf_q5_0x8.cpp also Q5_1, gguf_q3_kx8.cpp,
// gguf_q2_kx8.cpp, gguf_iq4_xsx8.cpp, gguf_q8_0x8.cpp, gguf_mxfp4x8.cpp also IQ4_NL):
// the same bytes
// in another order, read only by those files; x8_source: the file type whose block sizes they keep
constexpr int Q4_0X8 = NUM_QTYPES, Q4_KX8 = NUM_QTYPES + 1, Q6_KX8 = NUM_QTYPES + 2, Q5_0X8 = NUM_QTYPES + 3,
              Q4_1X8 = NUM_QTYPES + 4, Q3_KX8 = NUM_QTYPES + 5, Q2_KX8 = NUM_QTYPES + 6,
              IQ4_XSX8 = NUM_QTYPES + 7, Q5_KX8 = NUM_QTYPES + 8,
              Q8_0X8 = NUM_QTYPES + 9, Q5_1X8 = NUM_QTYPES + 10, MXFP4X8 = NUM_QTYPES + 11,
              IQ4_NLX8 = NUM_QTYPES + 12, LAST_X8 = IQ4_NLX8;
constexpr bool is_x8(int qt) { return qt >= Q4_0X8 && qt <= LAST_X8; }
constexpr int x8_source(int qt) {
  return qt == Q4_0X8 ? Q4_0 : qt == Q4_KX8 ? Q4_K : qt == Q6_KX8 ? Q6_K : qt == Q5_0X8 ? Q5_0
      : qt == Q4_1X8 ? Q4_1 : qt == Q3_KX8 ? Q3_K : qt == Q2_KX8 ? Q2_K
      : qt == IQ4_XSX8 ? IQ4_XS : qt == Q5_KX8 ? Q5_K : qt == Q8_0X8 ? Q8_0
      : qt == Q5_1X8 ? Q5_1 : qt == MXFP4X8 ? MXFP4 : qt == IQ4_NLX8 ? IQ4_NL : qt;
}
constexpr int kBlockElems[NUM_QTYPES] = {32, 32, 32, 32, 32, 256, 256, 256, 256, 256, 256, 32, 32, 32,
                                         256, 256, 256, 256, 256, 256, 256, 32};
constexpr int kBlockBytes[NUM_QTYPES] = {18, 20, 22, 24, 34, 144, 176, 210, 110, 136, 84, 64, 64, 18,
                                         66, 74, 82, 98, 110, 50, 56, 17};
// types whose values are unsigned with an offset per 32 (the min term; Q2_K: per 16); the others are signed, min 0
constexpr bool kHasMin[NUM_QTYPES] = {false, true, false, true, false, true, true, false, false, false, true, false,
                                       false, false, false, false, false, false, false, false, false, false};
// 16-bit float weights: float activations on every path (an int8 call multiplies these parts in float)
constexpr bool kFloat16(int qt) { return qt == F16 || qt == BF16; }
// an offset per 16 values (Q2_K); the others' two halves share theirs
constexpr bool kMinPer16(int qt) { return qt == Q2_K; }
// a scale per 16 values (the others: one per 32, scale[2s] == scale[2s + 1])
constexpr bool kScalePer16(int qt) {
  return qt == Q6_K || qt == Q3_K || qt == Q2_K || qt == IQ2_XS || qt == IQ2_S || qt == IQ1_M;
}
// the grid types (gguf_iq1_grids.h, gguf_iq2_grids.h, gguf_iq3_grids.h)
constexpr bool kGrid(int qt) { return qt >= IQ2_XXS && qt <= IQ1_M; }
constexpr bool kIQ1(int qt) { return qt == IQ1_S || qt == IQ1_M; }
// signed values over the whole int8 range, no stored offset to keep (VNNI feeds them as q ^ 0x80)
constexpr bool kFullSigned(int qt) {
  return qt == Q8_0 || qt == IQ4_XS || qt == IQ4_NL || qt == MXFP4 || kGrid(qt);
}
// IQ4_XS's and IQ4_NL's 16 non-linear levels (llama.cpp's kvalues_iq4nl)
constexpr int8_t kIQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
// MXFP4's 16 E2M1 values, doubled (llama.cpp's kvalues_mxfp4)
constexpr int8_t kMXFP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// MXFP4's scale: half of the E8M0 exponent byte's 2^(e - 127), built from its bits (e < 2: subnormal), exact
static inline float e8m0_half(uint8_t e) {
  const uint32_t u = e < 2 ? 0x00200000u << e : static_cast<uint32_t>(e - 1) << 23;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline float f16(const uint8_t* p) {   // exact either way; F16C is one instruction (K-quants read 16/block)
  uint16_t h;
  std::memcpy(&h, p, 2);
#ifdef __F16C__
  return _cvtsh_ss(h);
#else
  return c10::detail::fp16_ieee_to_fp32_value(h);
#endif
}

static inline float bf16(const uint8_t* p) {   // a bfloat16 is a float32's high half
  uint16_t h;
  std::memcpy(&h, p, 2);
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Q4_K / Q5_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes
static inline void scale_min_k4(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q3_K: the signed 6-bit scale of 16-value group i (0..15) from the 12 packed bytes
static inline int scale_q3_k(const uint8_t* sc, int i) {
  const int lo = i < 8 ? sc[i] & 15 : sc[i - 8] >> 4;
  const int hi = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (lo | (hi << 4)) - 32;
}

// IQ4_XS: the signed 6-bit scale of sub-block s (0..7) of block b
static inline int scale_iq4_xs(const uint8_t* b, int s) {
  const int sh = b[2] | (b[3] << 8);
  return (((b[4 + s / 2] >> (4 * (s % 2))) & 15) | (((sh >> (2 * s)) & 3) << 4)) - 32;
}

struct Decoded {
  int8_t q[256];
  float scale[16];
  float min[16];
};

}  // namespace gguf
// the i-quant grid types' decoders (decode_grid): they use the constants, f16 and Decoded above
#include "gguf_grid_blocks.h"
namespace gguf {

// one block -> (q, scale, min); the portable reference every faster path must agree with
static inline void decode_block(int qt, const uint8_t* b, Decoded& o) {
  switch (qt) {
    case Q4_0: case Q4_1: {
      const uint8_t* qs = b + (qt == Q4_0 ? 2 : 4);
      const int off = qt == Q4_0 ? 8 : 0;
      for (int j = 0; j < 16; ++j) {
        o.q[j] = static_cast<int8_t>((qs[j] & 15) - off);
        o.q[j + 16] = static_cast<int8_t>((qs[j] >> 4) - off);
      }
      o.scale[0] = o.scale[1] = f16(b);
      o.min[0] = o.min[1] = qt == Q4_1 ? f16(b + 2) : 0.f;
      break;
    }
    case Q5_0: case Q5_1: {
      const int h = qt == Q5_0 ? 2 : 4;
      uint32_t qh;
      std::memcpy(&qh, b + h, 4);
      const uint8_t* qs = b + h + 4;
      const int off = qt == Q5_0 ? 16 : 0;
      for (int j = 0; j < 16; ++j) {
        o.q[j] = static_cast<int8_t>(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - off);
        o.q[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - off);
      }
      o.scale[0] = o.scale[1] = f16(b);
      o.min[0] = o.min[1] = qt == Q5_1 ? f16(b + 2) : 0.f;
      break;
    }
    case Q8_0:
      std::memcpy(o.q, b + 2, 32);
      o.scale[0] = o.scale[1] = f16(b);
      o.min[0] = o.min[1] = 0.f;
      break;
    case Q4_K: case Q5_K: {
      const float d = f16(b), dmin = f16(b + 2);
      const uint8_t* qh = b + 16;
      const uint8_t* qs = b + (qt == Q4_K ? 16 : 48);
      for (int s = 0; s < 8; ++s) {
        int sc, mn;
        scale_min_k4(b + 4, s, sc, mn);
        o.scale[2 * s] = o.scale[2 * s + 1] = d * static_cast<float>(sc);
        o.min[2 * s] = o.min[2 * s + 1] = -(dmin * static_cast<float>(mn));
        const uint8_t* g = qs + (s / 2) * 32;
        for (int l = 0; l < 32; ++l) {
          int v = (s & 1) ? (g[l] >> 4) : (g[l] & 15);
          if (qt == Q5_K) v |= ((qh[l] >> s) & 1) << 4;
          o.q[s * 32 + l] = static_cast<int8_t>(v);
        }
      }
      break;
    }
    case Q6_K: {
      const float d = f16(b + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
      for (int i = 0; i < 16; ++i) o.scale[i] = d * static_cast<float>(sc[i]);
      for (int s = 0; s < 8; ++s) {
        const int h = s / 4, i = s % 4;
        const uint8_t* ql = b + h * 64 + (i & 1) * 32;
        const uint8_t* qh = b + 128 + h * 32;
        for (int l = 0; l < 32; ++l) {
          const int lo = i >= 2 ? (ql[l] >> 4) : (ql[l] & 15);
          o.q[s * 32 + l] = static_cast<int8_t>((lo | (((qh[l] >> (2 * i)) & 3) << 4)) - 32);
        }
        o.min[2 * s] = o.min[2 * s + 1] = 0.f;
      }
      break;
    }
    case Q3_K: {   // hmask[32] qs[64] scales[12] d: value (q & 3) - 4 unless its hmask bit is set, scale per 16
      const float d = f16(b + 108);
      const uint8_t* sc = b + 96;
      for (int i = 0; i < 16; ++i) o.scale[i] = d * static_cast<float>(scale_q3_k(sc, i));
      for (int e = 0; e < 256; ++e) {   // value e: 128-half h, 2-bit plane j, byte l
        const int h = e / 128, j = (e % 128) / 32, l = e % 32;
        const int q = (b[32 + h * 32 + l] >> (2 * j)) & 3;
        o.q[e] = static_cast<int8_t>(q - (((b[l] >> (4 * h + j)) & 1) ? 0 : 4));
      }
      for (int i = 0; i < 16; ++i) o.min[i] = 0.f;
      break;
    }
    case IQ4_NL: {   // d qs[16]: values from kIQ4NL, low nibbles 0-15, high 16-31
      const float d = f16(b);
      o.scale[0] = o.scale[1] = d;
      o.min[0] = o.min[1] = 0.f;
      for (int l = 0; l < 16; ++l) {
        o.q[l] = kIQ4NL[b[2 + l] & 15];
        o.q[16 + l] = kIQ4NL[b[2 + l] >> 4];
      }
      break;
    }
    case MXFP4: {    // e qs[16]: values from kMXFP4, low nibbles 0-15, high 16-31
      o.scale[0] = o.scale[1] = e8m0_half(b[0]);
      o.min[0] = o.min[1] = 0.f;
      for (int l = 0; l < 16; ++l) {
        o.q[l] = kMXFP4[b[1 + l] & 15];
        o.q[16 + l] = kMXFP4[b[1 + l] >> 4];
      }
      break;
    }
    case IQ4_XS: {   // d scales_h(u16) scales_l[4] qs[128]: 6-bit scale per 32, values from kIQ4NL
      const float d = f16(b);
      for (int s = 0; s < 8; ++s) {
        o.scale[2 * s] = o.scale[2 * s + 1] = d * static_cast<float>(scale_iq4_xs(b, s));
        const uint8_t* qs = b + 8 + 16 * s;
        for (int l = 0; l < 16; ++l) {
          o.q[32 * s + l] = kIQ4NL[qs[l] & 15];
          o.q[32 * s + 16 + l] = kIQ4NL[qs[l] >> 4];
        }
        o.min[2 * s] = o.min[2 * s + 1] = 0.f;
      }
      break;
    }
    case Q2_K: {   // scales[16] (4-bit scale | 4-bit min << 4) qs[64] d dmin: value (q & 3) * scale - min, per 16
      const float d = f16(b + 80), dmin = f16(b + 82);
      for (int i = 0; i < 16; ++i) {
        o.scale[i] = d * static_cast<float>(b[i] & 15);
        o.min[i] = -(dmin * static_cast<float>(b[i] >> 4));
      }
      for (int e = 0; e < 256; ++e)      // value e: 128-half h, 2-bit plane j, byte l
        o.q[e] = static_cast<int8_t>((b[16 + (e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3);
      break;
    }
    case IQ2_XXS: decode_grid<IQ2_XXS>(b, o); break;
    case IQ2_XS: decode_grid<IQ2_XS>(b, o); break;
    case IQ2_S: decode_grid<IQ2_S>(b, o); break;
    case IQ3_XXS: decode_grid<IQ3_XXS>(b, o); break;
    case IQ3_S: decode_grid<IQ3_S>(b, o); break;
    case IQ1_S: decode_grid<IQ1_S>(b, o); break;
    case IQ1_M: decode_grid<IQ1_M>(b, o); break;
    default:
      break;
  }
}

// one block -> float32 weights, bit-identical to the reference dequantizer
static inline void dequant_block(int qt, const uint8_t* b, float* __restrict w) {
  if (kFloat16(qt)) {
    for (int e = 0; e < 32; ++e) w[e] = qt == F16 ? f16(b + 2 * e) : bf16(b + 2 * e);
    return;
  }
  Decoded o;
  decode_block(qt, b, o);
  const int n = kBlockElems[qt];
  for (int e = 0; e < n; ++e) {
    const float v = static_cast<float>(o.q[e]) * o.scale[e / 16];
    // NOTE: types without an offset must not add one: x + 0.f turns -0.f into +0.f (harmless) but, more to the
    // point, the reference computes these as a single product
    w[e] = kHasMin[qt] ? v + o.min[e / 16] : v;
  }
}

}  // namespace gguf
