// Opens a region compiled for one x86 vector ISA; vec/isa_end.h closes it.
// The including file defines FASTTX_ISA_AVX2 or FASTTX_ISA_AVX512 first, and
// includes this after its ATen headers: at::vec must be compiled inside.
//
// Why: torch builds extensions for baseline x86-64, where at::vec::Vectorized
// is a scalar loop (std::erf, std::exp, ...). Inside the region it is ATen's
// AVX2 or AVX-512 implementation, the one ATen's own kernels use, calling the
// Sleef functions libtorch exports. Each kernel file is compiled once per ISA
// (csrc/cpu/<op>_avx2.cpp, <op>_avx512.cpp) into namespace fasttx::avx2 or
// fasttx::avx512, and cpu/cpu_features.h picks one at run time.
//
// Defines FASTTX_ISA (the namespace) when the region is compiled at all, i.e.
// on x86-64 with GCC, the compiler torch builds with.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#if defined(FASTTX_ISA_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define FASTTX_ISA avx512
#elif defined(FASTTX_ISA_AVX2)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FASTTX_ISA avx2
#else
#error "define FASTTX_ISA_AVX2 or FASTTX_ISA_AVX512 before including cpu/vec/isa_begin.h"
#endif
// The target pragma does not define __AVX__/__AVX512F__ in C++, and sleef.h
// declares its 8- and 16-lane functions only under them.
#if defined(FASTTX_ISA_AVX512) && !defined(__AVX512F__)
#define __AVX512F__ 1
#define FASTTX_UNDEF_AVX512F
#endif
#if !defined(__AVX__)
#define __AVX__ 1
#define __AVX2__ 1
#define FASTTX_UNDEF_AVX
#endif
#include <sleef.h>
#ifdef FASTTX_UNDEF_AVX512F
#undef __AVX512F__
#endif
#ifdef FASTTX_UNDEF_AVX
#undef __AVX__
#undef __AVX2__
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#endif
