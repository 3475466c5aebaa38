#include "cpu/cpu_features.h"

#include <cstdlib>
#include <cstring>

#include <unistd.h>

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

constexpr int64_t kMinStreamBytes = int64_t(16) << 20;

// FASTTX_STREAM_BYTES, or -1 when it is not set.
int64_t stream_bytes_from_env() {
  const char* v = std::getenv("FASTTX_STREAM_BYTES");
  return v && *v ? std::max<int64_t>(0, std::atoll(v)) : -1;
}
}  // namespace

bool stream_forward_output(int64_t bytes) {
  static const int64_t threshold = [] {
    if (const int64_t env = stream_bytes_from_env(); env >= 0) return env;
    int64_t llc = 0;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    llc = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return std::max(kMinStreamBytes, llc / 4 * 3);
  }();
  return bytes >= threshold;
}

bool stream_backward_output(int64_t bytes) {
  static const int64_t threshold = [] {
    const int64_t env = stream_bytes_from_env();
    return env >= 0 ? env : kMinStreamBytes;
  }();
  return bytes >= threshold;
}

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
