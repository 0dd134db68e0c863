/* Attention kernels for CPU fp32 (engine/kernels.py builds them with kernels.c): decode rows over
   the paged cache in place, and causal attention of a prompt's (or chunk's) new queries. */
#include "kernels.h"

/* Decode attention over a paged cache, one query per sequence, read where the blocks lie.

   q (n, Hq, D), rows q_stride floats apart; caches (slots, Hkv, D) with slot = block * bs + offset;
   sequence s has ctx[s] tokens, in blocks tables[s, :]. When k_new / v_new are given (rows
   k_stride / v_stride floats apart, Hkv * D each), sequence s's new token is first written at
   position ctx[s] - 1. out (n, Hq, D) = softmax(q K^T * scale) V per query head, query head h
   reading KV head h / (Hq / Hkv). Each cached token's K (then V) row is read once, whole, in
   position order. Returns 0, or -1 when the score workspace cannot be allocated. */
long pd_decode_attention_f32(const float *restrict q, long q_stride, const float *restrict k_new, long k_stride,
                             const float *restrict v_new, long v_stride, float *restrict k_cache,
                             float *restrict v_cache, const long *restrict tables, long max_blocks,
                             const long *restrict ctx, long bs, long n, long Hq, long Hkv, long D,
                             float scale, float *restrict out) {
    long G = Hq / Hkv, max_ctx = 0, row = Hkv * D;
    for (long s = 0; s < n; s++) max_ctx = ctx[s] > max_ctx ? ctx[s] : max_ctx;
    float *sc = malloc(sizeof(float) * (size_t)(Hq * max_ctx + 1));
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
        for (long j = 0; j < c; j++) {
            const float *kr = k_cache + (tb[j / bs] * bs + j % bs) * row;
            for (long g = 0, h = 0; g < Hkv; g++)
                for (long r = 0; r < G; r++, h++) sc[h * c + j] = dot(qs + h * D, kr + g * D, D) * scale;
        }
        for (long h = 0; h < Hq; h++) {
            float *p = sc + h * c, mx = -INFINITY, sum = 0.f;
            for (long j = 0; j < c; j++) mx = p[j] > mx ? p[j] : mx;
            for (long j = 0; j < c; j++) p[j] = expf(p[j] - mx);
#pragma omp simd reduction(+ : sum)
            for (long j = 0; j < c; j++) sum += p[j];
            float inv = 1.0f / sum;
            for (long j = 0; j < c; j++) p[j] *= inv;
        }
        memset(os, 0, sizeof(float) * Hq * D);
        for (long j = 0; j < c; j++) {
            const float *vr = v_cache + (tb[j / bs] * bs + j % bs) * row;
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
        float *p = sc + m * Lp, mx = -INFINITY, sum = 0.f;
        long n = first + m + 1;
#pragma omp simd reduction(max : mx)
        for (long j = 0; j < n; j++) mx = p[j] > mx ? p[j] : mx;
#pragma omp simd
        for (long j = 0; j < n; j++) p[j] = expf(p[j] - mx);
#pragma omp simd reduction(+ : sum)
        for (long j = 0; j < n; j++) sum += p[j];
        float inv = 1.0f / sum;
#pragma omp simd
        for (long j = 0; j < n; j++) p[j] *= inv;
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
