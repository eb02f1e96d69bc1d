// The ISA level the GGUF kernels run at: what this CPU can run (checked at run time, so one build serves every x86
// CPU kind), the level Python picked (lmserve/ops/cpu_isa.py, LMSERVE_CPU_ISA), and whether 16-bit weights take
// the AVX512-BF16 path.
#include "ops.h"
#include <atomic>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "gguf_kernels.h"

namespace gguf {
namespace {

std::atomic<int> g_isa{-1};

// Linux hands out the AMX tile state only to a process that asks (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA, once per process); a kernel that refuses (older than 5.16) means no AMX level
bool amx_permitted() {
  static const bool ok = [] {
#if defined(__linux__) && defined(__x86_64__)
    constexpr long kGetPerm = 0x1022, kReqPerm = 0x1023;
    constexpr int kXtileData = 18;
    unsigned long bits = 0;
    return syscall(SYS_arch_prctl, kReqPerm, kXtileData) == 0 && syscall(SYS_arch_prctl, kGetPerm, &bits) == 0 &&
           (bits & (1ul << kXtileData)) != 0;
#else
    return false;
#endif
  }();
  return ok;
}

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
    case ISA_AMX:
      return avx512 && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("amx-tile") &&
             __builtin_cpu_supports("amx-int8") && amx_permitted();
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

// AMD family 0x19 (Zen 3 and Zen 4; only Zen 4 has AVX-512) executes a 512-bit operation as two 256-bit halves
bool cpu_splits_512() {
#if defined(__x86_64__)
  static const bool splits = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    const bool amd = b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;   // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    return ((a >> 8) & 0xf) + ((a >> 20) & 0xff) == 0x19;
  }();
  return splits;
#else
  return false;
#endif
}

int cpu_best_isa() {
  int best = ISA_SCALAR;
  for (int level = ISA_AVX2; level <= ISA_AMX; ++level)
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
  TORCH_CHECK(level >= ISA_SCALAR && level <= ISA_AMX, "gguf_set_isa: unknown level ", level);
  // refuse rather than crash later: a level the CPU lacks would hit an illegal instruction
  TORCH_CHECK(cpu_supports(static_cast<int>(level)), "gguf_set_isa: this CPU does not support ISA level ", level,
              " (best: ", cpu_best_isa(), ")");
#ifndef LMSERVE_GGUF_AVX2
  TORCH_CHECK(level == ISA_SCALAR, "gguf_set_isa: this build has only the portable code (no AVX2 baseline)");
#endif
  g_isa.store(static_cast<int>(level));
  return level;
}

