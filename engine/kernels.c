/* Native kernels for CPU fp32 decode steps (engine/kernels.py builds and loads this file).

   Batch-1 decode is a read of the weights, so the matrix-vector product must stream them at
   the memory's speed. Each matrix is repacked once into panels of P = 4 vectors of output rows,
   stored k-major: panel p holds w[p*P + j, k] at [k*P + j]. A panel is then one sequential
   stream, each step of k is four vector loads times a broadcast of x[k], and no horizontal sum
   is left at the end (the row-major loop it replaces paid one per output: ~1.3x a reduction over
   the same bytes, against ~1.02-1.1x here; BENCHMARKS.md §1). */
#include "kernels.h"

long pd_panel_rows(void) { return P; }

/* wp (ceil(N / P), K, P) <- w (N, K) row-major; rows past N are zero. */
void pd_pack_f32(const float *restrict w, float *restrict wp, long N, long K) {
    for (long n0 = 0; n0 < N; n0 += P) {
        float *dst = wp + n0 * K;
        for (long j = 0; j < P; j++) {
            const float *src = w + (n0 + j) * K;
            if (n0 + j < N)
                for (long k = 0; k < K; k++) dst[k * P + j] = src[k];
            else
                for (long k = 0; k < K; k++) dst[k * P + j] = 0.f;
        }
    }
}

/* tile (M, P) = x (M, K; rows ldx floats apart) @ one panel (K, P). M is a constant after inlining.
   With pf, each k step also prefetches `npf` cache lines from pf + k * npf lines on (the next panel's
   share of this pass, see pd_gemv_packed_f32). */
static inline __attribute__((always_inline)) void panel_tile(const float *restrict x, long ldx,
                                                             const float *restrict wp, long K,
                                                             float *restrict tile, const int M,
                                                             const char *pf, int npf) {
    vf acc[TILE_ROWS][4];
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = (vf){0};
    long k = 0;
    if (M == 1) { /* a second set of accumulators: 8 independent FMA chains at one row */
        vf acc2[4] = {{0}};
        for (; k + 2 <= K; k += 2) {
            const float *r = wp + k * P;
            vf x0 = vsplat(x[k]), x1 = vsplat(x[k + 1]);
            for (int j = 0; j < 4; j++) {
                acc[0][j] = vfma(vload(r + j * VL), x0, acc[0][j]);
                acc2[j] = vfma(vload(r + P + j * VL), x1, acc2[j]);
            }
        }
        for (int j = 0; j < 4; j++) acc[0][j] += acc2[j];
    }
    if (pf)
        for (; k < K; k++) {
            const char *line = pf + k * npf * 64;
            for (int i = 0; i < npf; i++) __builtin_prefetch(line + i * 64, 0, 3);
            fma_rows(acc, wp + k * P, x + k, ldx, M);
        }
    for (; k < K; k++) fma_rows(acc, wp + k * P, x + k, ldx, M);
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4; j++) vstore(tile + m * P + j * VL, acc[m][j]);
}

/* y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) (+ add[m, n]), m < M, with w packed by
   pd_pack_f32; x, y, add row-major and contiguous.

   Each panel is streamed once per group of rows, the M rows split into the fewest groups of at most
   TILE_ROWS, as even as they go (16 rows: 6 + 5 + 5 with AVX-512). Only the first pass over a panel
   reads memory and the later ones run from L2, so without help a step's matrices (not in cache at
   decode) cost their read from memory plus their FMAs. At more than 8 rows the passes therefore
   also prefetch the next panel (it follows this one in wp), each pass its share spread over its k
   steps, and memory streams while the FMAs run. At fewer rows a pass is bound by memory anyway, and
   the prefetches slowed 8 rows down (BENCHMARKS.md §1). */
void pd_gemv_packed_f32(const float *restrict x, const float *restrict wp, const float *restrict bias,
                        const float *add, float *y, long M, long N, long K) { /* y may be add (in place) */
    float tile[TILE_ROWS * P];
    long groups = (M + TILE_ROWS - 1) / TILE_ROWS;
    long lines = K * P * (long)sizeof(float) / 64; /* cache lines per panel */
    /* lines prefetched per k step, so that the passes together cover the next panel */
    int npf = groups * K > 0 ? (int)((lines + groups * K - 1) / (groups * K)) : 0;
    for (long n0 = 0; n0 < N; n0 += P) {
        const float *panel = wp + n0 * K;
        long width = N - n0 < P ? N - n0 : P;
        const char *next = M > 8 && n0 + P < N ? (const char *)(panel + P * K) : NULL;
        for (long g = 0, m0 = 0; g < groups; g++) { /* rows past the first group find the panel in cache */
            long rows = (M - m0) / (groups - g) + ((M - m0) % (groups - g) != 0);
            const float *xm = x + m0 * K;
            const char *pf = next ? next + g * K * npf * 64 : NULL;
            if (pf && g * K * npf >= lines) pf = NULL; /* the earlier passes covered the panel */
            switch (rows) {
                case 1: panel_tile(xm, K, panel, K, tile, 1, pf, npf); break;
                case 2: panel_tile(xm, K, panel, K, tile, 2, pf, npf); break;
                case 3: panel_tile(xm, K, panel, K, tile, 3, pf, npf); break;
#if TILE_ROWS > 4
                case 4: panel_tile(xm, K, panel, K, tile, 4, pf, npf); break;
                case 5: panel_tile(xm, K, panel, K, tile, 5, pf, npf); break;
#endif
                default: panel_tile(xm, K, panel, K, tile, TILE_ROWS, pf, npf); break;
            }
            for (long m = 0; m < rows; m++)
                for (long j = 0; j < width; j++) {
                    float v = tile[m * P + j];
                    if (bias) v += bias[n0 + j];
                    if (add) v += add[(m0 + m) * N + n0 + j];
                    y[(m0 + m) * N + n0 + j] = v;
                }
            m0 += rows;
        }
    }
}

/* Rotary embedding of T tokens x H heads x D dims (x rows `stride` floats apart, y contiguous):
   y = x * cos + swap_halves(x) * sin_signed, with cos / sin_signed (T, D). */
void pd_rope_f32(const float *restrict x, long stride, const float *restrict cos_, const float *restrict sin_,
                 float *restrict y, long T, long H, long D) {
    long half = D / 2;
    for (long t = 0; t < T; t++) {
        const float *c = cos_ + t * D, *s = sin_ + t * D;
        for (long h = 0; h < H; h++) {
            const float *xh = x + t * stride + h * D;
            float *yh = y + (t * H + h) * D;
            for (long i = 0; i < half; i++) yh[i] = xh[i] * c[i] + xh[i + half] * s[i];
            for (long i = half; i < D; i++) yh[i] = xh[i] * c[i] + xh[i - half] * s[i];
        }
    }
}

/* y[m, j] = silu(g[m, j]) * u[m, j] with g = gu[m, :I], u = gu[m, I:] (gu rows 2I floats). */
void pd_silu_mul_f32(const float *restrict gu, float *restrict y, long M, long I) {
    for (long m = 0; m < M; m++) {
        const float *g = gu + m * 2 * I, *u = g + I;
        float *ym = y + m * I;
        for (long j = 0; j < I; j++) ym[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, rows of K floats (HF's LlamaRMSNorm in fp32). */
void pd_rmsnorm_f32(const float *restrict x, const float *restrict w, float eps, float *restrict y, long M, long K) {
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float *ym = y + m * K;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (long k = 0; k < K; k++) ss += xm[k] * xm[k];
        float r = 1.0f / sqrtf(ss / (float)K + eps);
#pragma omp simd
        for (long k = 0; k < K; k++) ym[k] = (xm[k] * r) * w[k];
    }
}

/* One decoder layer of a decode step at a few rows (the GEMV's), every row a decode (engine/layers.py's
   DecoderLayer in one call, the same kernels in the same order, so the same numbers):
   x += o_proj(attention(rope(qkv(norm1(x))))); x += down(silu_mul(gate_up(norm2(x)))). */
typedef struct {
    long M, hidden, Hq, Hkv, D, inter;
    float eps, scale;
    const float *cos, *sin;     /* (M, D) each */
    const long *tables, *ctx;   /* (M, max_blocks), (M,) */
    long max_blocks, block_size;
    float *work;                /* pd_decode_layer_work floats */
} pd_step;

typedef struct {
    const float *norm1, *norm2;                 /* (hidden,) */
    const float *qkv, *qkv_bias, *o, *gate_up, *down; /* packed weights; qkv_bias may be NULL */
    float *k_cache, *v_cache;                   /* (slots, Hkv, D) */
} pd_layer;

long pd_decode_layer_work(const pd_step *st) {
    long qkv = (st->Hq + 2 * st->Hkv) * st->D;
    return st->M * (st->hidden + qkv + (st->Hq + st->Hkv) * st->D + st->Hq * st->D + 3 * st->inter);
}

long pd_decode_layer_f32(const pd_step *st, const pd_layer *ly, float *x) {
    long M = st->M, H = st->hidden, D = st->D, Hq = st->Hq, Hkv = st->Hkv;
    long nqkv = (Hq + 2 * Hkv) * D, nqk = (Hq + Hkv) * D;
    float *normed = st->work, *qkv = normed + M * H, *qk = qkv + M * nqkv, *att = qk + M * nqk;
    float *gu = att + M * Hq * D, *act = gu + M * 2 * st->inter;
    pd_rmsnorm_f32(x, ly->norm1, st->eps, normed, M, H);
    pd_gemv_packed_f32(normed, ly->qkv, ly->qkv_bias, NULL, qkv, M, nqkv, H);
    pd_rope_f32(qkv, nqkv, st->cos, st->sin, qk, M, Hq + Hkv, D);
    long rc = pd_decode_attention_f32(qk, nqk, qk + Hq * D, nqk, qkv + nqk, nqkv, ly->k_cache, ly->v_cache,
                                      st->tables, st->max_blocks, st->ctx, st->block_size, M, Hq, Hkv, D,
                                      st->scale, att);
    if (rc != 0) return rc;
    pd_gemv_packed_f32(att, ly->o, NULL, x, x, M, H, Hq * D);
    pd_rmsnorm_f32(x, ly->norm2, st->eps, normed, M, H);
    pd_gemv_packed_f32(normed, ly->gate_up, NULL, NULL, gu, M, 2 * st->inter, H);
    pd_silu_mul_f32(gu, act, M, st->inter);
    pd_gemv_packed_f32(act, ly->down, NULL, x, x, M, H, st->inter);
    return 0;
}
