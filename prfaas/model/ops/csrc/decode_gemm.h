/* Skinny products for the decode step: y (rows, n) = x (rows, k) W^T over a packed weight.
 *
 * A panel holds PW output columns for every k, (k, PW) contiguous, so the kernel broadcasts one
 * x value and multiplies two vectors of weights: MB rows by NP panels of accumulators stay in
 * vector registers for the whole k loop (no horizontal sums), and a panel, read once from memory,
 * is reused by every row block while it sits in L1. Few rows (batch 1) take up to four panels at
 * once, so that enough independent multiply-adds are in flight. bf16 weights are widened to
 * float32 in registers (a shift); the sums are float32.
 *
 * Several products that do not depend on each other run as one job list: the threads split the
 * panels of all of them, then meet at one barrier.
 */
#ifndef PRFAAS_DECODE_GEMM_H
#define PRFAAS_DECODE_GEMM_H

#include "decode_common.h"

enum { STORE = 0, ACCUMULATE = 1 };

typedef struct {
    const float *x;
    long ldx;
    const lin_t *w;
    float *y;
    long ldy;
    int rows, mode, rnd; /* rnd: round the product (and the accumulated sum) to bf16 */
} job_t;

static inline __attribute__((always_inline)) vf load_w(const void *w, size_t i, const int bf16)
{
    return bf16 ? load_bf16v((const uint16_t *)w + i) : loadv((const float *)w + i);
}

/* rows [0, MB) of x times panels [0, NP) starting at `panel`, into tile (MB, NP * PW) */
static inline __attribute__((always_inline)) void micro(
    const float *x, long ldx, const void *w, size_t panel, int K, float *tile, const int MB, const int NP,
    const int bf16)
{
    vf acc[8][8];
#pragma GCC unroll 8
    for (int b = 0; b < MB; b++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NP; j++) acc[b][j] = (vf){0};
    for (int k = 0; k < K; k++) {
        vf wv[8];
#pragma GCC unroll 8
        for (int p = 0; p < NP; p++) {
            const size_t base = ((panel + p) * (size_t)K + k) * PW;
            wv[2 * p] = load_w(w, base, bf16);
            wv[2 * p + 1] = load_w(w, base + JB, bf16);
        }
#pragma GCC unroll 8
        for (int b = 0; b < MB; b++) {
            const float xb = x[b * ldx + k];
#pragma GCC unroll 8
            for (int j = 0; j < 2 * NP; j++) acc[b][j] += xb * wv[j];
        }
    }
#pragma GCC unroll 8
    for (int b = 0; b < MB; b++)
#pragma GCC unroll 8
        for (int j = 0; j < 2 * NP; j++) storev(tile + (b * 2 * NP + j) * JB, acc[b][j]);
}

/* tile (mb, width) into y: ncols columns, plus bias, stored or added, rounded where asked */
static void store_tile(const float *tile, int mb, int width, float *y, long ldy, int ncols, const float *bias,
                       int mode, int rnd)
{
    for (int b = 0; b < mb; b++) {
        const float *t = tile + b * width;
        float *yb = y + b * ldy;
        if (!rnd && !bias) {
            if (mode == ACCUMULATE)
                for (int c = 0; c < ncols; c++) yb[c] += t[c];
            else
                memcpy(yb, t, sizeof(float) * ncols);
            continue;
        }
        for (int c = 0; c < ncols; c++) {
            float v = RND(rnd, t[c] + (bias ? bias[c] : 0.0f));
            yb[c] = mode == ACCUMULATE ? RND(rnd, yb[c] + v) : v;
        }
    }
}

/* the row blocks (8, 4, 2, 1 rows) take 1, 2, 4, 4 panels at once: 8 to 16 accumulators; the
 * panels left over at the end of a range go one at a time */
#define MICRO(MB_, NP_) (bf16 ? micro(x, ldx, w, panel, K, tile, MB_, NP_, 1) : micro(x, ldx, w, panel, K, tile, MB_, NP_, 0))

static void micro_dispatch(const float *x, long ldx, const void *w, size_t panel, int K, float *tile, int mb, int np,
                           int bf16)
{
    if (np == 1) {
        if (mb == 1) MICRO(1, 1);
        else if (mb == 2) MICRO(2, 1);
        else if (mb == 4) MICRO(4, 1);
        else MICRO(8, 1);
    } else if (mb == 1) MICRO(1, 4);
    else if (mb == 2) MICRO(2, 4);
    else MICRO(4, 2);
}

static inline int block_rows(int rows) { return rows >= 8 ? 8 : rows >= 4 ? 4 : rows >= 2 ? 2 : 1; }
static inline int block_panels(int mb) { return mb <= 2 ? 4 : mb == 4 ? 2 : 1; }

static inline int panels_of(const lin_t *w) { return (w->n + PW - 1) / PW; }

/* panels [p0, p1) of one job, every row: a group of up to four panels at a time, every row block
 * over it while it sits in cache (row blocks outermost would stream the whole weight once per
 * block of 8 rows: twice at batch 16) */
static void job_panels(const job_t *j, int p0, int p1)
{
    const lin_t *w = j->w;
    for (int g = p0; g < p1; g += 4) {
        const int ge = p1 - g > 4 ? g + 4 : p1;
        for (int b0 = 0; b0 < j->rows;) {
            const int mb = block_rows(j->rows - b0), np_max = block_panels(mb);
            for (int p = g; p < ge;) {
                const int np = ge - p >= np_max ? np_max : 1;
                const int c0 = p * PW, ncols = (w->n - c0 < np * PW) ? w->n - c0 : np * PW;
                float tile[8 * 4 * PW] __attribute__((aligned(64)));
                micro_dispatch(j->x + b0 * j->ldx, j->ldx, w->w, (size_t)p, w->k, tile, mb, np, w->bf16);
                store_tile(tile, mb, np * PW, j->y + b0 * j->ldy + c0, j->ldy, ncols,
                           w->bias ? w->bias + c0 : NULL, j->mode, j->rnd);
                p += np;
            }
            b0 += mb;
        }
    }
}

/* every job, the panels split across the team's threads; ends with a barrier */
static void run_jobs(const job_t *jobs, int n)
{
    long total = 0;
    for (int i = 0; i < n; i++)
        if (jobs[i].rows > 0) total += panels_of(jobs[i].w);
    long lo, hi;
    split(total, &lo, &hi);
    long base = 0;
    for (int i = 0; i < n && base < hi; i++) {
        if (jobs[i].rows <= 0) continue;
        const long np = panels_of(jobs[i].w);
        const long a = lo > base ? lo : base, b = hi < base + np ? hi : base + np;
        if (a < b) job_panels(&jobs[i], (int)(a - base), (int)(b - base));
        base += np;
    }
    BARRIER();
}

static void gemm(const float *x, long ldx, const lin_t *w, float *y, long ldy, int rows, int mode, int rnd)
{
    const job_t j = {x, ldx, w, y, ldy, rows, mode, rnd};
    run_jobs(&j, 1);
}

#endif
