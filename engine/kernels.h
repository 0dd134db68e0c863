/* Shared by the native kernels (engine/kernels.py compiles kernels.c and attention_kernels.c
   together): the vector type, its loads and stores, and small vector helpers. */
#ifndef PD_KERNELS_H
#define PD_KERNELS_H
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* GCC/Clang vector extensions: one AVX-512 register, two AVX2 or four NEON registers. */
#if defined(__AVX512F__)
#define VL 16
#else
#define VL 8
#endif
#define P (4 * VL) /* output rows per panel */
typedef float vf __attribute__((vector_size(VL * sizeof(float))));

#ifdef PD_MVEC /* glibc's vector expf (libmvec), declared as math.h does under -ffast-math: the
                  silu and softmax loops then call it 16 lanes at a time (~7x less time for silu) */
float expf(float) __attribute__((simd("notinbranch")));
#endif

static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
static inline vf vbroadcast(float s) { return (vf){0} + s; }

/* s splatted with no add (`(vf){0} + s` keeps its add under strict fp: -0 + 0 is +0), and a * b + c as
   one FMA where the CPU has it: the library builds with -ffp-contract=off, so the elementwise
   kernels round as torch's ops do; the GEMV and prompt attention, whose multiply-adds set their
   time, ask for FMAs by name. */
static inline vf vsplat(float s) {
    vf v = {s};
#if VL == 16
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
#else
    return __builtin_shufflevector(v, v, 0, 0, 0, 0, 0, 0, 0, 0);
#endif
}

/* Pins four loaded vectors in registers: without it the compiler folds each load into every FMA
   that reads it, so a tile of four rows issued 16 loads for 16 FMAs where 4 suffice. */
#if defined(__x86_64__)
#define PD_IN_REGS(a, b, c, d) __asm__("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d))
#else
#define PD_IN_REGS(a, b, c, d) ((void)0)
#endif

static inline vf vfma(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__) && VL == 8
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}

/* Rows of the GEMV's register tile: TILE_ROWS x 4 accumulators, 4 weight vectors and a splat must fit
   the vector registers (32 with AVX-512: 6 rows use 29; 16 otherwise: 4 rows would already spill). */
#if defined(__AVX512F__)
#define TILE_ROWS 6
#else
#define TILE_ROWS 4
#endif

/* acc[m][j] += r[j * VL ...] * s[m * s_stride] for m < M, j < 4: one k step of a tile of M <= TILE_ROWS
   rows by 4 vectors (the GEMV's panel row, or attention's K^T panel row / V row), r read once. */
static inline __attribute__((always_inline)) void fma_rows(vf acc[][4], const float *restrict r,
                                                           const float *restrict s, long s_stride, const int M) {
    vf w0 = vload(r), w1 = vload(r + VL), w2 = vload(r + 2 * VL), w3 = vload(r + 3 * VL);
    PD_IN_REGS(w0, w1, w2, w3);
    for (int m = 0; m < M; m++) {
        vf sm = vsplat(s[m * s_stride]);
        acc[m][0] = vfma(w0, sm, acc[m][0]);
        acc[m][1] = vfma(w1, sm, acc[m][1]);
        acc[m][2] = vfma(w2, sm, acc[m][2]);
        acc[m][3] = vfma(w3, sm, acc[m][3]);
    }
}

static inline float hsum(vf v) {
    typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
    typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
#if VL == 16
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
           __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    v8 a = v;
#endif
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

static inline float dot(const float *restrict a, const float *restrict b, long D) {
    if (D % VL == 0) {
        vf acc = {0};
        for (long i = 0; i < D; i += VL) acc += vload(a + i) * vload(b + i);
        return hsum(acc);
    }
    float s = 0.f;
    for (long i = 0; i < D; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *restrict y, float a, const float *restrict x, long D) {
    if (D % VL == 0) {
        vf av = vbroadcast(a);
        for (long i = 0; i < D; i += VL) vstore(y + i, vload(y + i) + av * vload(x + i));
        return;
    }
    for (long i = 0; i < D; i++) y[i] += a * x[i];
}


long pd_decode_attention_f32(const float *restrict q, long q_stride, const float *restrict k_new, long k_stride,
                             const float *restrict v_new, long v_stride, float *restrict k_cache,
                             float *restrict v_cache, const long *restrict tables, long max_blocks,
                             const long *restrict ctx, long bs, long n, long Hq, long Hkv, long D,
                             float scale, float *restrict out);
#endif
