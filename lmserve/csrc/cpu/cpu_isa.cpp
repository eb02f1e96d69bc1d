// The ISA level the GGUF kernels run at: what this CPU can run (checked at run time, so one build serves every x86
// CPU kind), the level Python picked (lmserve/ops/cpu_isa.py, LMSERVE_CPU_ISA), and whether 16-bit weights take
// the AVX512-BF16 path.
#include "ops.h"
#include <atomic>
#include "gguf_kernels.h"

namespace gguf {
namespace {

std::atomic<int> g_isa{-1};

// whether this CPU can run code of `level` (the same rule as cpu_isa.py supports())
bool cpu_supports(int level) {
  if (level == ISA_SCALAR) return true;
#if defined(__x86_64__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  switch (level) {
    case ISA_AVX2: return avx2;
    case ISA_AVXVNNI: return avx2 && __builtin_cpu_supports("avxvnni");
    case ISA_AVX512: return avx512;
    case ISA_AVX512VNNI: return avx512 && __builtin_cpu_supports("avx512vnni");
    default: return false;
  }
#else
  return false;
#endif
}

// native bf16 dot products (vdpbf16ps): F16 / BF16 weights' non-exact path (gguf_bf16_avx512.cpp)
bool cpu_bf16() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace

int cpu_best_isa() {
  int best = ISA_SCALAR;
  for (int level = ISA_AVX2; level <= ISA_AVX512VNNI; ++level)
    if (cpu_supports(level)) best = level;
  return best;
}

// the level the kernels run at: set by Python (cpu_isa.isa()) and never above what this build and CPU can run
int isa_level() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = cpu_best_isa();
    g_isa.store(v);
  }
  return v;
}

// whether F16 / BF16 parts of non-exact calls run on AVX512-BF16: the CPU has it and the level allows AVX-512
// (an ISA override to avx2 turns it off, as it turns off the AVX512-VNNI kernels)
bool bf16_dot() {
#ifdef LMSERVE_GGUF_AVX2
  static const bool has = cpu_bf16();
  return has && isa_level() >= ISA_AVX512;
#else
  return false;
#endif
}

}  // namespace gguf

using namespace gguf;

int64_t gguf_isa() { return isa_level(); }

bool gguf_bf16_dot() { return bf16_dot(); }

int64_t gguf_set_isa(int64_t level) {
  TORCH_CHECK(level >= ISA_SCALAR && level <= ISA_AVX512VNNI, "gguf_set_isa: unknown level ", level);
  // refuse rather than crash later: a level the CPU lacks would hit an illegal instruction
  TORCH_CHECK(cpu_supports(static_cast<int>(level)), "gguf_set_isa: this CPU does not support ISA level ", level,
              " (best: ", cpu_best_isa(), ")");
#ifndef LMSERVE_GGUF_AVX2
  TORCH_CHECK(level == ISA_SCALAR, "gguf_set_isa: this build has only the portable code (no AVX2 baseline)");
#endif
  g_isa.store(static_cast<int>(level));
  return level;
}

