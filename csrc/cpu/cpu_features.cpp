#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fasttx {

namespace {
// glibc serves blocks of at least this size (its largest mmap threshold) with
// fresh mmap()s, whose first touch page-faults.
constexpr size_t kHugePageMinBytes = size_t(32) << 20;

bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* v = std::getenv("FASTTX_HUGE_PAGES");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return wanted;
}
}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  auto t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Smaller blocks come from glibc's heap, already mapped and reused: asking
  // for huge pages there only makes the kernel collapse pages under us.
  if (!huge_pages_wanted() || t.nbytes() < kHugePageMinBytes) return t;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + t.nbytes()) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
  return t;
}

}  // namespace fasttx
