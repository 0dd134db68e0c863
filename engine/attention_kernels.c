/* Attention kernels for CPU fp32 (engine/kernels.py builds them with kernels.c): decode rows over
   the paged cache in place, and causal attention of a prompt's (or chunk's) new queries. */
#include "kernels.h"

/* out[i] = the sum of v[i]'s lanes, i < VL: one butterfly of shuffles and adds over all VL vectors
   (log2 VL levels) in place of VL horizontal sums. The lanes come out in bit-reversed order, which
   the last shuffle undoes. */
static inline vf sum_lanes(vf v[VL]) {
#if VL == 16
    vf a[8], b[4], c[2], r;
    for (int i = 0; i < 8; i++)
        a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
               __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
        b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
               __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
        c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
               __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    r = __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
        __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    return __builtin_shufflevector(r, r, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
#else
    vf r;
    for (int i = 0; i < VL; i++) r[i] = hsum(v[i]);
    return r;
#endif
}

/* Softmax over p[0, c) in place. */
static void softmax(float *p, long c) {
    float mx = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : mx)
    for (long j = 0; j < c; j++) mx = p[j] > mx ? p[j] : mx;
#pragma omp simd
    for (long j = 0; j < c; j++) p[j] = expf(p[j] - mx);
#pragma omp simd reduction(+ : sum)
    for (long j = 0; j < c; j++) sum += p[j];
    float inv = 1.0f / sum;
#pragma omp simd
    for (long j = 0; j < c; j++) p[j] *= inv;
}

/* Where token j's row starts in a paged cache, in floats from the cache's start. */
static inline long slot_offset(const long *tb, long bs, long row, long j) { return (tb[j / bs] * bs + j % bs) * row; }

/* Prefetches the 4 * VL floats at r (a KV head's part of a cached row). */
static inline void prefetch_row(const float *r) {
    for (int i = 0; i < 4; i++) __builtin_prefetch(r + i * VL, 0, 3);
}

/* The G heads' vectors of D = 4 * VL floats at p (heads D floats apart) into t, and back. */
static inline __attribute__((always_inline)) void load_heads(vf t[4][4], const float *p, const int G) {
    for (int r = 0; r < G; r++)
        for (int i = 0; i < 4; i++) t[r][i] = vload(p + (r * 4 + i) * VL);
}

static inline __attribute__((always_inline)) void store_heads(float *p, vf t[4][4], const int G) {
    for (int r = 0; r < G; r++)
        for (int i = 0; i < 4; i++) vstore(p + (r * 4 + i) * VL, t[r][i]);
}

/* One sequence's decode attention, D = 4 * VL, G <= 4 query heads per KV head, block size a multiple
   of VL: q (Hkv * G, D) -> out (Hkv * G, D) over its c cached tokens. The keys go VL at a time (within
   one block, so contiguous rows), and for each KV head the G query vectors stay in registers while
   its part of each K row is read; a key's G dot products are left as vectors, and one sum_lanes turns
   VL keys of a head into VL scores. The V rows go the same way, each KV head's G outputs held in
   registers over the VL rows. So every K and V row is read once, in place, in position order; while
   one group of VL rows is read, the next group's (its own block when the table jumps) is prefetched
   the same way, since a KV head reads only part of each row and the hardware's stream prefetch
   does not follow that.
   sc (Hkv * G, cp), cp >= c rounded up to VL; rows of the caches `row` floats apart. */
static inline __attribute__((always_inline)) void decode_sequence(const float *restrict q, const float *k_cache,
                                                                  const float *v_cache, const long *restrict tb,
                                                                  long bs, long row, long Hkv, long c, float scale,
                                                                  float *restrict sc, long cp, float *restrict out,
                                                                  const int G) {
    const long D = 4 * VL;
    for (long j0 = 0; j0 < c; j0 += VL) {
        long n = c - j0 < VL ? c - j0 : VL, first = slot_offset(tb, bs, row, j0);
        const float *next = j0 + VL < c ? k_cache + slot_offset(tb, bs, row, j0 + VL) : NULL;
        for (long g = 0; g < Hkv; g++) {
            const float *kb = k_cache + first + g * D, *qg = q + g * G * D;
            vf qv[4][4], part[4][VL];
            load_heads(qv, qg, G);
            for (long t = 0; t < n; t++) {
                const float *kr = kb + t * row;
                if (next) prefetch_row(next + t * row + g * D);
                vf k0 = vload(kr), k1 = vload(kr + VL), k2 = vload(kr + 2 * VL), k3 = vload(kr + 3 * VL);
                for (int r = 0; r < G; r++)
                    part[r][t] = vfma(qv[r][3], k3, vfma(qv[r][2], k2, vfma(qv[r][1], k1, qv[r][0] * k0)));
            }
            for (int r = 0; r < G; r++) {
                for (long t = n; t < VL; t++) part[r][t] = (vf){0};
                vstore(sc + (g * G + r) * cp + j0, sum_lanes(part[r]) * scale);
            }
        }
    }
    for (long h = 0; h < Hkv * G; h++) softmax(sc + h * cp, c);
    memset(out, 0, sizeof(float) * (size_t)(Hkv * G * D));
    for (long j0 = 0; j0 < c; j0 += VL) {
        long n = c - j0 < VL ? c - j0 : VL, first = slot_offset(tb, bs, row, j0);
        const float *next = j0 + VL < c ? v_cache + slot_offset(tb, bs, row, j0 + VL) : NULL;
        for (long g = 0; g < Hkv; g++) {
            const float *vb = v_cache + first + g * D, *p = sc + g * G * cp + j0;
            float *og = out + g * G * D;
            vf acc[4][4];
            load_heads(acc, og, G);
            for (long t = 0; t < n; t++) {
                const float *vr = vb + t * row;
                if (next) prefetch_row(next + t * row + g * D);
                vf v0 = vload(vr), v1 = vload(vr + VL), v2 = vload(vr + 2 * VL), v3 = vload(vr + 3 * VL);
                PD_IN_REGS(v0, v1, v2, v3);
                for (int r = 0; r < G; r++) {
                    vf w = vsplat(p[r * cp + t]);
                    acc[r][0] = vfma(v0, w, acc[r][0]);
                    acc[r][1] = vfma(v1, w, acc[r][1]);
                    acc[r][2] = vfma(v2, w, acc[r][2]);
                    acc[r][3] = vfma(v3, w, acc[r][3]);
                }
            }
            store_heads(og, acc, G);
        }
    }
}

/* Decode attention over a paged cache, one query per sequence, read where the blocks lie.

   q (n, Hq, D), rows q_stride floats apart; caches (slots, Hkv, D) with slot = block * bs + offset;
   sequence s has ctx[s] tokens, in blocks tables[s, :]. When k_new / v_new are given (rows
   k_stride / v_stride floats apart, Hkv * D each), sequence s's new token is first written at
   position ctx[s] - 1. out (n, Hq, D) = softmax(q K^T * scale) V per query head, query head h
   reading KV head h / (Hq / Hkv). With D = 4 * VL, at most 4 query heads per KV head and blocks of a
   multiple of VL tokens (SmolLM2 in the engine: 64, 3 and 16), decode_sequence reads each cached K
   and V row once for all the query heads; otherwise each (token, head) pair is a dot product and an
   axpy. Returns 0, or -1 when the score workspace cannot be allocated. */
long pd_decode_attention_f32(const float *restrict q, long q_stride, const float *restrict k_new, long k_stride,
                             const float *restrict v_new, long v_stride, float *restrict k_cache,
                             float *restrict v_cache, const long *restrict tables, long max_blocks,
                             const long *restrict ctx, long bs, long n, long Hq, long Hkv, long D,
                             float scale, float *restrict out) {
    long G = Hq / Hkv, max_ctx = 0, row = Hkv * D;
    for (long s = 0; s < n; s++) max_ctx = ctx[s] > max_ctx ? ctx[s] : max_ctx;
    long cp = (max_ctx + VL - 1) / VL * VL;
    float *sc = malloc(sizeof(float) * (size_t)(Hq * cp + 1));
    if (!sc) return -1;
    for (long s = 0; s < n; s++) {
        const long c = ctx[s], *tb = tables + s * max_blocks;
        const float *qs = q + s * q_stride;
        float *os = out + s * Hq * D;
        if (k_new) {
            long slot = tb[(c - 1) / bs] * bs + (c - 1) % bs;
            memcpy(k_cache + slot * row, k_new + s * k_stride, sizeof(float) * row);
            memcpy(v_cache + slot * row, v_new + s * v_stride, sizeof(float) * row);
        }
        if (D == 4 * VL && G <= 4 && bs % VL == 0) {
            switch (G) {
                case 1: decode_sequence(qs, k_cache, v_cache, tb, bs, row, Hkv, c, scale, sc, cp, os, 1); break;
                case 2: decode_sequence(qs, k_cache, v_cache, tb, bs, row, Hkv, c, scale, sc, cp, os, 2); break;
                case 3: decode_sequence(qs, k_cache, v_cache, tb, bs, row, Hkv, c, scale, sc, cp, os, 3); break;
                default: decode_sequence(qs, k_cache, v_cache, tb, bs, row, Hkv, c, scale, sc, cp, os, 4); break;
            }
            continue;
        }
        for (long j = 0; j < c; j++) {
            const float *kr = k_cache + slot_offset(tb, bs, row, j);
            for (long g = 0, h = 0; g < Hkv; g++)
                for (long r = 0; r < G; r++, h++) sc[h * c + j] = dot(qs + h * D, kr + g * D, D) * scale;
        }
        for (long h = 0; h < Hq; h++) softmax(sc + h * c, c);
        memset(os, 0, sizeof(float) * Hq * D);
        for (long j = 0; j < c; j++) {
            const float *vr = v_cache + slot_offset(tb, bs, row, j);
            for (long g = 0, h = 0; g < Hkv; g++)
                for (long r = 0; r < G; r++, h++) axpy(os + h * D, sc[h * c + j], vr + g * D, D);
        }
    }
    free(sc);
    return 0;
}

#define KT P /* keys per score tile (4 vectors) */

/* Scores of rows m < M (queries q + m * q_stride) against keys [0, n_keys): sc[m * Lp + j] =
   q_m . k_j * scale, from kt, K^T in panels of KT keys stored d-major ([t][d][KT]). */
static inline __attribute__((always_inline)) void score_rows(const float *restrict q, long q_stride,
                                                             const float *restrict kt, long n_keys, long D,
                                                             float scale, float *restrict sc, long Lp, const int M) {
    for (long t0 = 0; t0 < n_keys; t0 += KT) {
        const float *panel = kt + t0 * D;
        vf acc[4][4];
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++) acc[m][j] = (vf){0};
        for (long d = 0; d < D; d++) fma_rows(acc, panel + d * KT, q + d, q_stride, M);
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++) vstore(sc + m * Lp + t0 + j * VL, acc[m][j] * scale);
    }
}

/* out rows m < M (out + m * out_stride) = sum_j p[m, j] v_j over keys [0, n_keys), 4 vectors of D at a time. */
static inline __attribute__((always_inline)) void weigh_rows(const float *restrict sc, long Lp,
                                                             const float *restrict v, long v_stride, long n_keys,
                                                             long D, float *restrict out, long out_stride,
                                                             const int M) {
    for (long c = 0; c < D; c += 4 * VL) {
        vf acc[4][4];
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++) acc[m][j] = (vf){0};
        for (long j = 0; j < n_keys; j++) fma_rows(acc, v + j * v_stride + c, sc + j, Lp, M);
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++) vstore(out + m * out_stride + c + j * VL, acc[m][j]);
    }
}

/* Softmax of row m over its keys [0, first + m], zeros after it up to n_keys (the group's last row's). */
static void softmax_rows(float *sc, long Lp, long first, long n_keys, long M) {
    for (long m = 0; m < M; m++) {
        float *p = sc + m * Lp;
        long n = first + m + 1;
        softmax(p, n);
        for (long j = n; j < n_keys; j++) p[j] = 0.f;
    }
}

/* Causal attention of one sequence's Lq new queries over its Lk keys (the queries are its last Lq
   positions: query i sees keys [0, Lk - Lq + i]). q (Lq, Hq, D), k, v (Lk, Hkv, D), out (Lq, Hq, D),
   each with its rows the given stride apart and every row's heads contiguous; query head h reads
   KV head h / (Hq / Hkv). D a multiple of 4 * VL. Each query head's queries go in fours: their
   scores against K^T (repacked once per KV head, so the score loop streams like the GEMV), a
   softmax per row, then the weighted sum of V rows read in place. Returns 0, or -1 without memory. */
long pd_prefill_attention_f32(const float *restrict q, long q_stride, const float *restrict k, long k_stride,
                                     const float *restrict v, long v_stride, long Lq, long Lk, long Hq, long Hkv,
                                     long D, float scale, float *restrict out, long out_stride) {
    long G = Hq / Hkv, Lp = (Lk + KT - 1) / KT * KT, offset = Lk - Lq;
    float *kt = malloc(sizeof(float) * (size_t)(D * Lp + 4 * Lp));
    if (!kt) return -1;
    float *sc = kt + D * Lp;
    for (long g = 0; g < Hkv; g++) {
        for (long t0 = 0; t0 < Lp; t0 += KT)
            for (long d = 0; d < D; d++)
                for (long j = 0; j < KT; j++)
                    kt[t0 * D + d * KT + j] = t0 + j < Lk ? k[(t0 + j) * k_stride + g * D + d] : 0.f;
        for (long h = g * G; h < (g + 1) * G; h++)
            for (long i0 = 0; i0 < Lq; i0 += 4) {
                long M = Lq - i0 < 4 ? Lq - i0 : 4, first = offset + i0, n_keys = first + M;
                const float *qm = q + i0 * q_stride + h * D;
                float *om = out + i0 * out_stride + h * D;
                const float *vg = v + g * D;
                switch (M) {
                    case 1: score_rows(qm, q_stride, kt, n_keys, D, scale, sc, Lp, 1); break;
                    case 2: score_rows(qm, q_stride, kt, n_keys, D, scale, sc, Lp, 2); break;
                    case 3: score_rows(qm, q_stride, kt, n_keys, D, scale, sc, Lp, 3); break;
                    default: score_rows(qm, q_stride, kt, n_keys, D, scale, sc, Lp, 4); break;
                }
                softmax_rows(sc, Lp, first, n_keys, M);
                switch (M) {
                    case 1: weigh_rows(sc, Lp, vg, v_stride, n_keys, D, om, out_stride, 1); break;
                    case 2: weigh_rows(sc, Lp, vg, v_stride, n_keys, D, om, out_stride, 2); break;
                    case 3: weigh_rows(sc, Lp, vg, v_stride, n_keys, D, om, out_stride, 3); break;
                    default: weigh_rows(sc, Lp, vg, v_stride, n_keys, D, om, out_stride, 4); break;
                }
            }
    }
    free(kt);
    return 0;
}
