/* Per-token pieces of the decode step: RMSNorms, rotary, the conv step, paged attention for GQA and
 * MLA (absorbed). Each works on the rows or (sequence, head) pairs it is given; the caller splits
 * the work between threads and puts the barriers. */
#ifndef PRFAAS_DECODE_OPS_H
#define PRFAAS_DECODE_OPS_H

#include "decode_common.h"

static inline float dot_any(const float *q, const void *k, int bf16, int n)
{
    int i = 0;
    vf acc = {0};
    if (bf16)
        for (; i + JB <= n; i += JB) acc += loadv(q + i) * load_bf16v((const uint16_t *)k + i);
    else
        for (; i + JB <= n; i += JB) acc += loadv(q + i) * loadv((const float *)k + i);
    float s = hsum(acc);
    for (; i < n; i++) s += q[i] * load_any(k, i, bf16);
    return s;
}

static inline void axpy_any(float *o, float p, const void *v, int bf16, int n)
{
    int i = 0;
    if (bf16)
        for (; i + JB <= n; i += JB) storev(o + i, loadv(o + i) + p * load_bf16v((const uint16_t *)v + i));
    else
        for (; i + JB <= n; i += JB) storev(o + i, loadv(o + i) + p * loadv((const float *)v + i));
    for (; i < n; i++) o[i] += p * load_any(v, i, bf16);
}

static inline float rms_inv(const float *x, int n, float eps)
{
    int i = 0;
    vf acc = {0};
    for (; i + JB <= n; i += JB) { vf v = loadv(x + i); acc += v * v; }
    float s = hsum(acc);
    for (; i < n; i++) s += x[i] * x[i];
    return 1.0f / sqrtf(s / (float)n + eps);
}

/* One RMSNorm of n values. NORM_SCALE_AFTER (Qwen3-Next's zero-centred norm, w = 1 + weight):
 * round(x * inv * w); NORM_CAST_FIRST (the plain norm): round(w * round(x * inv)). */
static inline void rms_norm(const float *x, float *y, int n, const float *w, float eps, int mode, int rnd)
{
    const float inv = rms_inv(x, n, eps);
    if (mode == NORM_SCALE_AFTER)
        for (int i = 0; i < n; i++) y[i] = RND(rnd, x[i] * inv * w[i]);
    else
        for (int i = 0; i < n; i++) y[i] = RND(rnd, w[i] * RND(rnd, x[i] * inv));
}

/* rows [lo, hi) of x (ld) normed into y (ld) */
static void rms_rows(const float *x, float *y, long ld, int n, const float *w, float eps, int mode, int rnd,
                     long lo, long hi)
{
    for (long r = lo; r < hi; r++) rms_norm(x + r * ld, y + r * ld, n, w, eps, mode, rnd);
}

/* The gated norm of one head: Qwen3-Next (silu gate, the normed x rounded before the weight) or
 * Kimi-Linear (sigmoid gate, float32 throughout), in place on x. */
static inline void gated_norm(float *x, const float *gate, int n, const float *w, float eps, int silu, int rnd)
{
    const float inv = rms_inv(x, n, eps);
    float act[512];
    memcpy(act, gate, sizeof(float) * n);
    if (silu) silu_row(act, n);
    else sigmoid_row(act, n);
    for (int i = 0; i < n; i++) {
        float y = x[i] * inv;
        y = silu ? RND(rnd, y) * w[i] * act[i] : y * w[i] * act[i];
        x[i] = RND(rnd, y);
    }
}

/* rotate_half rotary on the first `rot` channels of one head, cos / sin of one position */
static inline void rotary(float *x, const float *cs, const float *sn, int rot, int rnd)
{
    const int half = rot / 2;
    for (int i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = RND(rnd, RND(rnd, x1 * cs[i]) - x2 * sn[i]);
        x[i + half] = RND(rnd, RND(rnd, x2 * cs[i]) + x1 * sn[i]);
    }
}

static inline void rotary_table(int64_t pos, int rot, float theta, int rnd, float *cs, float *sn)
{
    for (int i = 0; i < rot / 2; i++) {
        const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)rot);
        const float f = (float)pos * inv_freq;
        cs[i] = RND(rnd, cosf(f));
        sn[i] = RND(rnd, sinf(f));
    }
}

/* The short conv for one token, channels [c0, c1): window = (state, x), y = silu(sum window * w);
 * the state shifts in place (cache dtype). The window is in the weight dtype, as the reference
 * casts it. Compiled per cache dtype, rounding and kernel width 4 (both families' conv), so that
 * the channel loop has no branch. */
static inline __attribute__((always_inline)) void conv_channels(
    const float *x, const float *w, const int W, void *state, const int cache_bf16, float *y, int c0, int c1,
    const int rnd)
{
    for (int c = c0; c < c1; c++) {
        const size_t base = (size_t)c * (W - 1);
        float win[16], s = 0.0f;
        for (int j = 0; j < W - 1; j++) win[j] = RND(rnd, load_any(state, base + j, cache_bf16));
        win[W - 1] = x[c];
        for (int j = 0; j < W; j++) s += RND(rnd, win[j] * w[(size_t)c * W + j]);
        y[c] = RND(rnd, s);
        for (int j = 0; j < W - 1; j++) store_any(state, base + j, cache_bf16, win[j + 1]);
    }
}

static void conv_step(const float *x, const float *w, int W, void *state, int cache_bf16, float *y,
                      int c0, int c1, int rnd)
{
#define CONV(W_, CB_, R_) conv_channels(x, w, W_, state, CB_, y, c0, c1, R_)
    if (W == 4) {
        if (cache_bf16) rnd ? CONV(4, 1, 1) : CONV(4, 1, 0);
        else rnd ? CONV(4, 0, 1) : CONV(4, 0, 0);
    } else {
        CONV(W, cache_bf16, rnd);
    }
#undef CONV
    silu_row(y + c0, c1 - c0);
    if (rnd)
        for (int c = c0; c < c1; c++) y[c] = round_bf16(y[c]);
}

/* token `off` of block `blk` in a paged cache of token_elems values per token */
static inline const void *token_at(const void *cache, int64_t blk, int off, int bs, size_t token_elems, int bf16)
{
    const size_t flat = ((size_t)blk * bs + (size_t)off) * token_elems;
    return bf16 ? (const void *)((const uint16_t *)cache + flat) : (const void *)((const float *)cache + flat);
}

/* for t in [0, n): the token's pointer (`ptr`), block by block (no division per token). The
 * blocks are anywhere in the pool and cold (the weights stream through the caches between two
 * visits): while a block is read, the same token of the next block is fetched ahead. */
#define FOR_TOKENS(cache, table, n, bs, elems, bf16, t, ptr, BODY)                                               \
    for (int64_t blk_ = 0, t = 0; t < (n); blk_++)                                                               \
        for (int off_ = 0; off_ < (bs) && t < (n); off_++, t++) {                                               \
            const void *ptr = token_at(cache, (table)[blk_], off_, bs, elems, bf16);                           \
            if (t + (bs) < (n)) {                                                                               \
                const char *next_ = (const char *)token_at(cache, (table)[blk_ + 1], off_, bs, elems, bf16);    \
                for (size_t b_ = 0; b_ < (elems) * ((bf16) ? 2 : 4); b_ += 64) __builtin_prefetch(next_ + b_, 0, 3); \
            }                                                                                                   \
            BODY;                                                                                               \
        }

static inline void softmax_rows(float *s, int rows, long ld, int n, int rnd_probs)
{
    for (int r = 0; r < rows; r++) {
        float *row = s + r * ld, mx = -INFINITY, sum = 0.0f;
        for (int t = 0; t < n; t++) mx = row[t] > mx ? row[t] : mx;
        int t = 0;
        vf acc = {0};
        for (; t + JB <= n; t += JB) { const vf e = vexp(loadv(row + t) - mx); storev(row + t, e); acc += e; }
        for (; t < n; t++) { row[t] = expf(row[t] - mx); sum += row[t]; }
        sum += hsum(acc);
        const float inv = 1.0f / sum;
        for (t = 0; t < n; t++) row[t] = RND(rnd_probs, row[t] * inv);
    }
}

/* GQA, one sequence, query heads [h0, h1) (any groups) in one pass over its keys and one over its
 * values: q (nh, hd) float32, out (nh, hd); scores scratch (h1 - h0, n). */
static void gqa_attend(const float *q, float *out, int h0, int h1, int group, int hd, int nkv, float scale,
                       const void *kc, const void *vc, const int32_t *table, int64_t n, int bs, int bf16,
                       float *scores, int rnd)
{
    const int nq = h1 - h0;
    const size_t tok = (size_t)nkv * hd;
#define HEAD(p, h) ((bf16) ? (const void *)((const uint16_t *)(p) + (size_t)((h) / group) * hd) \
                           : (const void *)((const float *)(p) + (size_t)((h) / group) * hd))
    FOR_TOKENS(kc, table, n, bs, tok, bf16, t, k, {
        for (int i = 0; i < nq; i++) scores[i * n + t] = dot_any(q + (size_t)(h0 + i) * hd, HEAD(k, h0 + i), bf16, hd) * scale;
    })
    softmax_rows(scores, nq, n, (int)n, 0);
    for (int i = 0; i < nq; i++) memset(out + (size_t)(h0 + i) * hd, 0, sizeof(float) * hd);
    FOR_TOKENS(vc, table, n, bs, tok, bf16, t, v, {
        for (int i = 0; i < nq; i++) axpy_any(out + (size_t)(h0 + i) * hd, scores[i * n + t], HEAD(v, h0 + i), bf16, hd);
    })
#undef HEAD
    if (rnd)
        for (int i = 0; i < nq; i++)
            for (int d = 0; d < hd; d++) out[(size_t)(h0 + i) * hd + d] = round_bf16(out[(size_t)(h0 + i) * hd + d]);
}

/* MLA absorbed, one sequence, heads [h0, h1): q_full (H, R + P) float32 over the latents
 * (R + P each, paged), o_lat (H, R). The reference rounds scores, probabilities and o_lat. */
static void mla_attend(const float *qf, float *o_lat, int h0, int h1, int R, int P, float scale,
                       const void *cache, const int32_t *table, int64_t n, int bs, int bf16, float *scores, int rnd)
{
    const int nq = h1 - h0, C = R + P;
    FOR_TOKENS(cache, table, n, bs, (size_t)C, bf16, t, c, {
        for (int i = 0; i < nq; i++)
            scores[i * n + t] = RND(rnd, RND(rnd, dot_any(qf + (size_t)(h0 + i) * C, c, bf16, C)) * scale);
    })
    softmax_rows(scores, nq, n, (int)n, rnd);
    for (int i = 0; i < nq; i++) memset(o_lat + (size_t)(h0 + i) * R, 0, sizeof(float) * R);
    FOR_TOKENS(cache, table, n, bs, (size_t)C, bf16, t, c, {
        for (int i = 0; i < nq; i++) axpy_any(o_lat + (size_t)(h0 + i) * R, scores[i * n + t], c, bf16, R);
    })
    if (rnd)
        for (int i = 0; i < nq; i++)
            for (int r = 0; r < R; r++) o_lat[(size_t)(h0 + i) * R + r] = round_bf16(o_lat[(size_t)(h0 + i) * R + r]);
}

/* For work over (sequence, head) pairs: this thread's pairs [lo, hi) of B * H, visited as runs of
 * heads of one sequence: fn(b, h0, h1) */
#define FOR_PAIRS(B_, H_, b, h0, h1, ...)                                              \
    do {                                                                                \
        long lo_, hi_;                                                                  \
        split((long)(B_) * (H_), &lo_, &hi_);                                           \
        for (long i_ = lo_; i_ < hi_;) {                                                \
            const int b = (int)(i_ / (H_)), h0 = (int)(i_ % (H_));                      \
            const long end_ = ((long)b + 1) * (H_) < hi_ ? ((long)b + 1) * (H_) : hi_;  \
            const int h1 = (int)(end_ - (long)b * (H_));                                \
            __VA_ARGS__;                                                                \
            i_ = end_;                                                                  \
        }                                                                               \
    } while (0)

#endif
