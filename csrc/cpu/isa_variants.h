// Compiles a row-kernel body once per x86 vector ISA and dispatches to the best one at run
// time, so one binary runs on any x86-64 CPU and uses AVX-512 where it exists.
//
// Usage, in a .cpp inside namespace peftkern::cpu, after the includes the body needs:
//   #define PEFTKERN_ISA_IMPL "my_rows_impl.h"
//   #include "isa_variants.h"
//   ... PEFTKERN_ISA_DISPATCH(my_function(args...)); ...
// The body gets namespaces avx512::, avx2:: (GCC on x86-64 only) and baseline::, each compiled
// under its own `#pragma GCC target`, with PEFTKERN_ISA_AVX512 or PEFTKERN_ISA_AVX2 defined
// in the first two. Without PEFTKERN_ISA_IMPL this header only defines the macros. A body
// that uses intrinsics under PEFTKERN_ISA_AVX512 needs <immintrin.h> included by its .cpp
// before this header.
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEFTKERN_X86_MULTIVERSION 1
#endif

#ifdef PEFTKERN_ISA_IMPL
#ifdef PEFTKERN_X86_MULTIVERSION
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,bmi2,fma,f16c")
namespace avx512 {
// Lets a body add hand-written AVX-512 paths (the target pragma defines no __AVX512F__).
#define PEFTKERN_ISA_AVX512 1
#include PEFTKERN_ISA_IMPL
#undef PEFTKERN_ISA_AVX512
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#define PEFTKERN_ISA_AVX2 1
#include PEFTKERN_ISA_IMPL
#undef PEFTKERN_ISA_AVX2
}  // namespace avx2
#pragma GCC pop_options
#endif
namespace baseline {
#include PEFTKERN_ISA_IMPL
}  // namespace baseline
#endif

#ifndef PEFTKERN_ISA_DISPATCH
#ifdef PEFTKERN_X86_MULTIVERSION
#define PEFTKERN_ISA_DISPATCH(call)          \
  switch (::peftkern::cpu::selected_isa()) { \
    case ::peftkern::cpu::Isa::avx512:       \
      return avx512::call;                   \
    case ::peftkern::cpu::Isa::avx2:         \
      return avx2::call;                     \
    default:                                 \
      return baseline::call;                 \
  }
#else
#define PEFTKERN_ISA_DISPATCH(call) return baseline::call;
#endif
#endif
