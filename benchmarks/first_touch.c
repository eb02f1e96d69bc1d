/* How fast this machine hands out new memory: first touch (one write per 4 KB) of 512 MB asked for as 2 MB pages
 * (MADV_HUGEPAGE, what THP_MEM_ALLOC_ENABLE gives PyTorch's buffers) or as 4 KB pages, three times in one process
 * (each time a new mapping; the second and third find the pages the first freed). Not a test.
 *   gcc -O2 benchmarks/first_touch.c -o /tmp/first_touch && /tmp/first_touch 1 && /tmp/first_touch 0 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  const size_t n = (size_t)512 << 20, huge = (size_t)2 << 20;
  const int thp = argc > 1 && atoi(argv[1]);
  for (int rep = 0; rep < 3; ++rep) {
    char* raw = mmap(NULL, n + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return 1;
    char* p = (char*)(((size_t)raw + huge - 1) & ~(huge - 1));   /* 2 MB aligned, so whole huge pages fit */
    madvise(p, n, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    const double t0 = now();
    for (size_t i = 0; i < n; i += 4096) p[i] = 1;
    const double t1 = now();
    printf("%s pages, round %d: first touch %.3f s (%.2f GB/s)\n", thp ? "2 MB" : "4 KB", rep, t1 - t0, n / (t1 - t0) / 1e9);
    munmap(raw, n + huge);
  }
  return 0;
}
