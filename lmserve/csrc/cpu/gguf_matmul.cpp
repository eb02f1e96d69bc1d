// gguf_matmul / gguf_dequantize on GGUF blocks in place (lmserve/ops/linear.py), the portable scalar reference and
// the large-M path (the ISA level they run at: cpu_isa.cpp).
//
// Every path computes a row's outputs with the same operations whatever M is (batch invariance: a request's
// greedy tokens do not depend on what else shares the step), threads over output columns:
// - int8 activations: quantized for every M, then the int8 GEMM (gguf_gemm_avx2.cpp; gguf_gemm_avx512.cpp, bit-
//   identical, where the level is avx512vnni) or the scalar dot below;
// - float activations, AVX2: dot products on the blocks up to max_dot_rows (gguf_dot_avx2.cpp), above it panels
//   of W dequantized exactly and a tile GEMM with the dot's per-output order (gguf_gemm_avx2.cpp);
// - float activations, scalar build: the scalar dot up to max_dot_rows; above it (NOT batch-invariant) tiles of
//   TILE_N rows of W dequantized into a cache-resident buffer and multiplied with at::mm.
// No dequantized copy of the whole matrix ever exists.
#include "ops.h"
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include "gguf_blocks.h"
#include "gguf_kernels.h"

namespace gguf {
namespace {

#ifdef LMSERVE_GGUF_AVX2
constexpr bool LMSERVE_HAS_AVX2 = true;
#else
constexpr bool LMSERVE_HAS_AVX2 = false;
#endif

constexpr int64_t TILE_N = 64;
// where the AVX512-VNNI kernels run (see gguf_matmul_parts): calls of >= min_rows rows, of every type or Q4_0 only
std::atomic<int64_t> g_vnni512_min_rows{1};
std::atomic<bool> g_vnni512_all_types{true};

// nb blocks of one row -> float32 (bit-identical to the reference on every path)
void dequant_row(int qt, const uint8_t* row, int64_t nb, float* out) {
#ifdef LMSERVE_GGUF_AVX2
  if (isa_level() >= ISA_AVX2) return dequant_avx2(qt, row, nb, out);
#endif
  for (int64_t b = 0; b < nb; ++b) dequant_block(qt, row + b * kBlockBytes[qt], out + b * kBlockElems[qt]);
}

// out: row m at out + m * ldo
void gemm_tiles(float* out, int64_t ldo, const at::Tensor& x, const uint8_t* w, int64_t ws, int qt, int64_t M,
                int64_t N, int64_t K) {
  const int64_t nb = K / kBlockElems[qt];
  at::Tensor tile = at::empty({TILE_N, K}, x.options());
  at::Tensor res = at::empty({M, TILE_N}, x.options());
  float* t = tile.data_ptr<float>();
  for (int64_t n0 = 0; n0 < N; n0 += TILE_N) {
    const int64_t tn = std::min(TILE_N, N - n0);
    at::parallel_for(0, tn, 8, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) dequant_row(qt, w + (n0 + r) * ws, nb, t + r * K);
    });
    at::Tensor rv = res.narrow(1, 0, tn);
    at::mm_out(rv, x, tile.narrow(0, 0, tn).t());
    const float* rp = rv.data_ptr<float>();
    const int64_t rs = rv.stride(0);
    at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) std::copy(rp + m * rs, rp + m * rs + tn, out + m * ldo + n0);
    });
  }
}

// Decode calls of a few rows on Zen 4 run the AVX2 tiles (bit for bit the same results): those read a thread's
// column range one group at a time, as one sequential stream, in 8-lane registers. The AVX512 tiles read two groups
// per register, two interleaved streams that restart at every group pair (9 KB each at K = 2048), and with one row
// there is no reuse to pay for it: on a Zen 4 host, with the weights in DRAM as in a model's decode, they measured
// 1.6-1.9x slower at M = 1-2 for Q4_0 / Q4_K (Q5_K: 1.5x at M = 1; Q8_0 likewise). Q6_K keeps its AVX512 tiles: its
// unpacking costs more than the second stream (from DRAM at M = 1, N 2048 x K 8192: AVX2 tile 0.60 ms, AVX512 0.47),
// and so does the table lookup of MXFP4 and IQ4_NL (the AVX2 tile's int16 sums, or |v| and sign(x, v), against
// vpdpbusd on v + 128; two threads, N 16384 x K 2048 from DRAM: MXFP4 M = 1 0.64-0.70 -> 0.42-0.55 ms, M = 2
// 0.83-0.89 -> 0.52-0.58; IQ4_NL M = 1 0.51 -> 0.34-0.38, M = 2 0.76 -> 0.36-0.39).
// Half-filled 512-bit registers are no cure: Zen 4 executes them as two 256-bit halves. On an Intel Sapphire Rapids
// host, whose 512-bit units are whole, it is the other way round: the AVX512 tiles took Q4_0 at M = 1 / 2 from
// 1.15 / 1.7 to 0.91 / 1.0 ms, Q4_K 1.2 / 1.35 to 1.07 / 1.17 (DRAM), a 1B decode step 26 -> 32 tok/s. So the rule
// follows the CPU (cpu_splits_512). Since x8::Ahead prefetches a chunk ahead (at K >= 8192 it had left one stream
// in two without), the Zen 4 gap is smaller: two threads, weights from DRAM (benchmarks/x8_tile_bench.cpp), M = 1
// level (Q4_K, Q4_0), M = 2 the AVX512 tiles 1.1-1.3x faster for Q4_K / Q4_0 but 0.94x for Q8_0; kept as it was.
int64_t stream_rows() {
  static const int64_t rows = cpu_splits_512() ? 2 : 0;
  return rows;
}

// the int8 GEMM on a repacked part (gguf_x8.h), on the best of its kernels this call may use
void x8_matmul(const DotArgs& p, int64_t n0, int64_t n1, [[maybe_unused]] bool avx2, [[maybe_unused]] bool vnni512,
               [[maybe_unused]] bool amx) {
  using Fn = void (*)(const DotArgs&, int64_t, int64_t);
  static constexpr Fn kScalar[] = {q4_0x8_scalar, q4_kx8_scalar, q6_kx8_scalar, q5_0x8_scalar, q4_1x8_scalar,
                                   q3_kx8_scalar, q2_kx8_scalar, iq4_xsx8_scalar, q5_kx8_scalar,
                                   q8_0x8_scalar, q5_1x8_scalar, mxfp4x8_scalar, iq4_nlx8_scalar};
  const int i = p.qt - Q4_0X8;
#ifdef LMSERVE_GGUF_AVX2
  static constexpr Fn kAvx2[] = {q4_0x8_avx2, q4_kx8_avx2, q6_kx8_avx2, q5_0x8_avx2, q4_1x8_avx2, q3_kx8_avx2,
                                 q2_kx8_avx2, iq4_xsx8_avx2, q5_kx8_avx2, q8_0x8_avx2, q5_1x8_avx2, mxfp4x8_avx2,
                                 iq4_nlx8_avx2};
  static constexpr Fn kVnni[] = {q4_0x8_avx512vnni, q4_kx8_avx512vnni, q6_kx8_avx512vnni,
                                  q5_0x8_avx512vnni, q4_1x8_avx512vnni, q3_kx8_avx512vnni,
                                  q2_kx8_avx512vnni, iq4_xsx8_avx512vnni, q5_kx8_avx512vnni,
                                  q8_0x8_avx512vnni, q5_1x8_avx512vnni, mxfp4x8_avx512vnni, iq4_nlx8_avx512vnni};
  if (avx2) {
    const bool lookup = p.qt == Q6_KX8 || p.qt == MXFP4X8 || p.qt == IQ4_NLX8;   // unpacking-bound: see above
    const Fn tiles = (vnni512 && (p.M > stream_rows() || lookup) ? kVnni : kAvx2)[i];
    if (amx && amx_x8_takes(p.qt, p.M)) return amx_x8(p, n0, n1, tiles);
    return tiles(p, n0, n1);
  }
#endif
  kScalar[i](p, n0, n1);
}

}  // namespace

// group g of the activations (32 values at x + 32 g) -> a.q, a.dx, a.qsum, a.ls, a.hs, a.sx: the reference
void quantize_group(Act& a, const float* x, int64_t g) {
  const float* xg = x + g * 32;
  float amax = 0.f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xg[j]));
  const float d = amax / 127.f;
  const float inv = d > 0.f ? 1.f / d : 0.f;
  for (int j = 0; j < 32; ++j) {
    // round half to even (the default rounding mode), as torch.round in the reference
    const int v = static_cast<int>(std::nearbyint(xg[j] * inv));
    a.q[g * 32 + j] = static_cast<int8_t>(v);
    if (j % 4 == 0) a.ls[g * 8 + j / 4] = 0;
    a.ls[g * 8 + j / 4] += v;
  }
  a.dx[g] = d;
  group_sums(a, g);
}

void quantize_act(Act& a, const float* x, int64_t M, int64_t K) {
  const int64_t ng = K / 32;
  a.q.resize(M * K);
  a.dx.resize(M * ng);
  a.sx.resize(M * ng);
  a.ls.resize(M * ng * 8);
  a.qsum.resize(M * ng);
  a.hs.resize(M * ng * 2);
#ifdef LMSERVE_GGUF_AVX2
  // the same values with AVX2 (a prefill's activations: ~7 ms of a 512 x 8192 call in scalar code)
  const bool avx2 = isa_level() >= ISA_AVX2;
#else
  const bool avx2 = false;
#endif
  at::parallel_for(0, M * ng, 256, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
#ifdef LMSERVE_GGUF_AVX2
      if (avx2) {
        quantize_group_avx2(a, x, g);
        continue;
      }
#endif
      quantize_group(a, x, g);
    }
  });
}

// The portable reference: decode each block to (q, scale, min) and accumulate in plain scalar order
void dot_scalar(const DotArgs& p, int64_t n0, int64_t n1) {
  const int be = kBlockElems[p.qt], bb = kBlockBytes[p.qt];
  const int64_t nb = p.K / be, ng = p.K / 32;
  Decoded o;
  alignas(32) float wf[256];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* blk = p.w + n * p.ws + b * bb;
        if (p.int8) {
          decode_block(p.qt, blk, o);
          for (int s = 0; s < be / 32; ++s) {
            const int64_t g = m * ng + b * (be / 32) + s;
            const int8_t* qx = p.a->q.data() + g * 32;
            for (int h = 0; h < 2; ++h) {
              int isum = 0;
              for (int j = 0; j < 16; ++j) isum += o.q[s * 32 + h * 16 + j] * qx[h * 16 + j];
              acc += o.scale[s * 2 + h] * p.a->dx[g] * static_cast<float>(isum);
            }
            if (kMinPer16(p.qt)) {     // each half's offset times its activations' sum (lanes 0-3, 4-7)
              const int32_t* ls = p.a->ls.data() + g * 8;
              acc += o.min[2 * s] * (p.a->dx[g] * static_cast<float>(ls[0] + ls[1] + ls[2] + ls[3]));
              acc += o.min[2 * s + 1] * (p.a->dx[g] * static_cast<float>(ls[4] + ls[5] + ls[6] + ls[7]));
            } else if (kHasMin[p.qt]) {
              acc += o.min[2 * s] * p.a->sx[g];
            }
          }
        } else {
          dequant_block(p.qt, blk, wf);
          const float* xr = p.x + m * p.K + b * be;
          for (int e = 0; e < be; ++e) acc += wf[e] * xr[e];
        }
      }
      p.out[m * p.N + n] = acc;
    }
  }
}

}  // namespace gguf

using namespace gguf;

void gguf_set_vnni512(int64_t min_rows, bool all_types) {
  g_vnni512_min_rows.store(min_rows);
  g_vnni512_all_types.store(all_types);
}

static int check_w(const at::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(qtype >= 0 && qtype <= LAST_X8, "gguf: unknown type id ", qtype);
  const int qt = static_cast<int>(qtype);
  const int bt = x8_source(qt);   // the block sizes of a repacked type are its source type's
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.stride(1) == 1, "gguf: blocks must be uint8 "
              "[N, row_bytes] with contiguous rows");
  TORCH_CHECK(K % kBlockElems[bt] == 0 && w.size(1) == K / kBlockElems[bt] * kBlockBytes[bt],
              "gguf: row bytes ", w.size(1), " do not hold K=", K, " values of this type");
  TORCH_CHECK(!is_x8(qt) || (w.size(0) % 8 == 0 && w.is_contiguous()),
              "gguf: a repacked matrix is whole groups of 8 contiguous rows");
  return qt;
}

void gguf_matmul_groups(const std::vector<MatmulGroup>& groups, bool int8, int64_t max_dot_rows) {
  // a part's arguments, where its columns start in the region's column range, and the paths it takes
  struct Part {
    DotArgs p;
    int64_t first, rows;
    bool vnni512, amx, tiles;
  };
  [[maybe_unused]] const int level = isa_level();
  const bool avx2 = LMSERVE_HAS_AVX2 && level >= ISA_AVX2;
  // 16-bit float parts have no int8 form: in an int8 (non-exact) call they take bf16 activations where the CPU
  // has AVX512-BF16, else the float activations (flag `int8` of their DotArgs: "the non-exact path")
  const bool bf16 = bf16_dot();
  std::vector<Act> acts(groups.size());      // sized once: the parts point into it
  std::vector<Part> parts;
  int64_t total = 0, max_m = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const at::Tensor &x = groups[g].x, &out = groups[g].out;
    const std::vector<at::Tensor>& ws = *groups[g].ws;
    const std::vector<int64_t>& qtypes = *groups[g].qtypes;
    TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.scalar_type() == at::kFloat &&
                out.scalar_type() == at::kFloat && x.dim() == 2);
    TORCH_CHECK(!ws.empty() && ws.size() == qtypes.size(), "gguf_matmul: one type per weight part");
    const int64_t M = x.size(0), K = x.size(1);
    std::vector<int> qts;
    std::vector<int64_t> first{0};     // output column where each part starts
    for (size_t i = 0; i < ws.size(); ++i) {
      qts.push_back(check_w(ws[i], qtypes[i], K));
      first.push_back(first.back() + ws[i].size(0));
    }
    const int64_t N = first.back();
    TORCH_CHECK(out.size(0) == M && out.size(1) == N, "gguf_matmul: out must be [M, N]");
    if (M == 0 || N == 0) continue;
    float* op = out.data_ptr<float>();
    // AVX512-VNNI runs for every M and type by default: on Zen 4 its decode tiles (8 lanes, vpdpbusd seeded with
    // the offset term) and its 4 x 4 GEMM tiles (16 lanes, 32 registers) measured faster than AVX2 for all 8 types
    // (docs/benchmarks.md); gguf_set_vnni512 narrows it (tests, A/B benchmarks). Same bits either way, so the
    // choice keeps batch invariance.
    const bool vnni512 =
        avx2 && level >= ISA_AVX512VNNI && M >= g_vnni512_min_rows.load() &&
        (g_vnni512_all_types.load() ||
         std::all_of(qts.begin(), qts.end(), [](int qt) { return qt == Q4_0 || is_x8(qt); }));
    // AMX tiles for repacked parts at >= Kind::min_rows rows where the CPU has them (gguf_amx.cpp): the same bits
    const bool amx = vnni512 && level >= ISA_AMX;
    TORCH_CHECK(int8 || std::none_of(qts.begin(), qts.end(), is_x8),
                "gguf_matmul: repacked weights take int8 activations only");
    auto part_int8 = [&](size_t i) { return int8 && (!kFloat16(qts[i]) || bf16); };
    std::vector<bool> done(ws.size(), false);
    if (!avx2 && M > max_dot_rows) {   // the scalar build's float parts above max_dot_rows: tiles through at::mm
      for (size_t i = 0; i < ws.size(); ++i) {
        if (part_int8(i)) continue;
        gemm_tiles(op + first[i], N, x, ws[i].data_ptr<uint8_t>(), ws[i].stride(0), qts[i], M, ws[i].size(0), K);
        done[i] = true;
      }
    }
    // the parts share one input: its int8 form is computed once, and one parallel region covers every part's rows
    Act& act = acts[g];
    bool any_int8 = false, any_bf16 = false;
    for (size_t i = 0; i < ws.size(); ++i) {
      any_int8 |= part_int8(i) && !done[i] && !kFloat16(qts[i]);
      any_bf16 |= part_int8(i) && !done[i] && kFloat16(qts[i]);
    }
    if (any_int8) quantize_act(act, x.data_ptr<float>(), M, K);
#ifdef LMSERVE_GGUF_AVX2
    if (amx && std::any_of(qts.begin(), qts.end(), [&](int qt) { return amx_x8_takes(qt, M); }))
      amx_pack_act(act, M, K);
    if (any_bf16) act_bf16(act, x.data_ptr<float>(), M, K);
#endif
    for (size_t i = 0; i < ws.size(); ++i) {
      if (done[i]) continue;
      parts.push_back(Part{DotArgs{qts[i], part_int8(i), op + first[i], x.data_ptr<float>(), &act,
                                   ws[i].data_ptr<uint8_t>(), ws[i].stride(0), M, N, K},
                           total + first[i], ws[i].size(0), vnni512, amx, M > max_dot_rows});
    }
    total += N;
    max_m = std::max(max_m, M);
  }
  if (parts.empty()) return;
  at::parallel_for(0, total, max_m > 16 ? 16 : 32, [&](int64_t n0, int64_t n1) {
    for (const Part& part : parts) {
      const int64_t a = std::max(n0, part.first) - part.first, b = std::min(n1, part.first + part.rows) - part.first;
      if (a >= b) continue;
      const DotArgs& p = part.p;
      if (is_x8(p.qt)) {
        x8_matmul(p, a, b, avx2, part.vnni512, part.amx);
        continue;
      }
#ifdef LMSERVE_GGUF_AVX2
      if (avx2) {
        if (p.int8 && kFloat16(p.qt)) bf16_avx512(p, a, b);
        else if (p.int8 && part.vnni512) int8_avx512vnni(p, a, b);
        else if (p.int8) int8_avx2(p, a, b);
        else if (part.tiles) float_gemm_avx2(p, a, b);
        else dot_float_avx2(p, a, b);
        continue;
      }
#endif
      dot_scalar(p, a, b);
    }
  });
}

void gguf_matmul_parts(at::Tensor out, at::Tensor x, std::vector<at::Tensor> ws, std::vector<int64_t> qtypes,
                       bool int8, int64_t max_dot_rows) {
  gguf_matmul_groups({MatmulGroup{out, x, &ws, &qtypes}}, int8, max_dot_rows);
}

void gguf_matmul(at::Tensor out, at::Tensor x, at::Tensor w, int64_t qtype, bool int8,
                 int64_t max_dot_rows) {
  gguf_matmul_parts(out, x, {w}, {qtype}, int8, max_dot_rows);
}

void gguf_dequantize(at::Tensor out, at::Tensor w, int64_t qtype, at::Tensor rows, bool use_rows) {
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kFloat && out.dim() == 2);
  const int64_t K = out.size(1), R = out.size(0);
  const int qt = check_w(w, qtype, K);
  TORCH_CHECK(!use_rows || (rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == R),
              "gguf_dequantize: rows must be int64 [len(out)]");
  TORCH_CHECK(use_rows || R == w.size(0), "gguf_dequantize: out must be [N, K]");
  const int64_t N = w.size(0), nb = K / kBlockElems[x8_source(qt)], ws = w.stride(0);
  const int64_t* rp = use_rows ? rows.data_ptr<int64_t>() : nullptr;
  if (use_rows) {
    for (int64_t i = 0; i < R; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < N, "gguf_dequantize: row out of range");
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = use_rows ? rp[r] : r;
      if (qt == Q4_0X8) q4_0x8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q4_KX8) q4_kx8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q6_KX8) q6_kx8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q5_0X8) q5_0x8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q4_1X8) q4_1x8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q3_KX8) q3_kx8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q2_KX8) q2_kx8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == IQ4_XSX8) iq4_xsx8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q5_KX8) q5_kx8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q8_0X8) q8_0x8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == Q5_1X8) q5_1x8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == MXFP4X8) mxfp4x8_rows(wp, ws, n, nb, op + r * K);
      else if (qt == IQ4_NLX8) iq4_nlx8_rows(wp, ws, n, nb, op + r * K);
      else dequant_row(qt, wp + n * ws, nb, op + r * K);
    }
  });
}

void gguf_repack(at::Tensor out, at::Tensor w, int64_t qtype) {
  TORCH_CHECK(qtype == Q4_0 || qtype == Q4_K || qtype == Q6_K || qtype == Q5_0 || qtype == Q4_1 || qtype == Q3_K ||
              qtype == Q2_K || qtype == IQ4_XS || qtype == Q5_K || qtype == Q8_0 || qtype == Q5_1 || qtype == MXFP4 ||
              qtype == IQ4_NL,
              "gguf_repack: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q3_K, Q2_K, IQ4_XS, MXFP4 or IQ4_NL only");
  const int qt = static_cast<int>(qtype);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous() && w.size(0) % 8 == 0 &&
              w.size(1) % kBlockBytes[qt] == 0, "gguf_repack: whole blocks, whole groups of 8 contiguous rows");
  TORCH_CHECK(out.sizes() == w.sizes() && out.scalar_type() == at::kByte && out.is_contiguous());
  const int64_t ws = w.size(1), nb = ws / kBlockBytes[qt];
  const uint8_t* src = w.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, w.size(0) / 8, 16, [&](int64_t g0, int64_t g1) {
    // IQ4_NL's block is Q4_0's bytes (fp16 d, 16 index bytes): IQ4_NLx8 is Q4_0x8's layout
    const auto pack = qt == Q4_0 || qt == IQ4_NL ? q4_0x8_pack : qt == Q4_K ? q4_kx8_pack : qt == Q6_K ? q6_kx8_pack
        : qt == Q5_0 ? q5_0x8_pack : qt == Q4_1 ? q4_1x8_pack : qt == Q3_K ? q3_kx8_pack : qt == Q2_K ? q2_kx8_pack
        : qt == IQ4_XS ? iq4_xsx8_pack : qt == Q5_K ? q5_kx8_pack : qt == Q8_0 ? q8_0x8_pack
        : qt == Q5_1 ? q5_1x8_pack : mxfp4x8_pack;
    for (int64_t g = g0; g < g1; ++g) pack(src, ws, g, nb, dst);
  });
}

std::string built_baseline() {
#ifdef LMSERVE_GGUF_AVX2
  return "avx2";
#else
  return "generic";
#endif
}
