#pragma once

// PEM_SIMD_CLONES: a function compiled twice, for AVX2 and for baseline x86-64, the one to run
// picked when the library loads (GCC/Clang function multi-versioning on the CPU's features), so
// the package gets SIMD speed without requiring AVX2 from every machine that installs it. The
// "avx2" clone has no FMA: the results are the same in both clones.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PEM_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PEM_SIMD_CLONES
#endif

// For the bodies those clones share (GCC does not clone templates): inlined into each clone, a
// body is compiled for that clone's target.
#define PEM_ALWAYS_INLINE __attribute__((always_inline)) inline
