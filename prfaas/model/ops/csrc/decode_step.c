/* One decode step of the hybrid model on the CPU, every layer, in one call: embedding, each
 * layer's token mixer and MLP, the final norm, the LM head and the greedy argmax, for B sequences
 * of one new token each. Python (prfaas/model/fast_decode/) packs the weights once, points the
 * structs at them and at the KV pool, and per step hands over the batch's tokens, positions,
 * slots and block tables; the torch layers stay the reference, and the tests compare the two.
 *
 * Threads: one OpenMP team for the whole step (the runtime torch itself uses, so no second pool);
 * every part splits its rows, panels or (sequence, head) pairs between the threads and ends at a
 * barrier. Without OpenMP it runs on the calling thread.
 */
#define _POSIX_C_SOURCE 199309L
#include "delta_rule.c"
#include "decode_common.h"
#include "decode_gemm.h"
#include "decode_ops.h"

/* Time per part of the step, on thread 0, in a build with -DPRFAAS_DECODE_TIMING only
 * (bench/decode_profile.py): PROF(part) adds the time since the previous PROF to that part.
 * Parts end at their barrier, so thread 0's time is the step's. */
enum { P_OTHER, P_NORM, P_GEMM, P_CONV, P_DELTA, P_ATTN_PREP, P_ATTN, P_ROUTE, P_MOE_GLUE, P_LM_HEAD, P_COUNT };
#ifdef PRFAAS_DECODE_TIMING
#include <time.h>
static double prof_acc[P_COUNT], prof_last;
static double prof_now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }
#define PROF(part) do { if (thread_id() == 0) { const double t_ = prof_now(); prof_acc[part] += t_ - prof_last; prof_last = t_; } } while (0)
#define PROF_START() do { if (thread_id() == 0) prof_last = prof_now(); } while (0)
#else
#define PROF(part) ((void)0)
#define PROF_START() ((void)0)
#endif

/* seconds per part since the last call (zeroed); returns the number of parts, 0 without timing */
int prfaas_decode_profile(double *out)
{
#ifdef PRFAAS_DECODE_TIMING
    for (int i = 0; i < P_COUNT; i++) { out[i] = prof_acc[i]; prof_acc[i] = 0.0; }
    return P_COUNT;
#else
    (void)out;
    return 0;
#endif
}

#if defined(__SSE__)
#define FTZ_ON() unsigned int csr_ = _mm_getcsr(); _mm_setcsr(csr_ | 0x8040)
#define FTZ_OFF() _mm_setcsr(csr_)
#else
#define FTZ_ON() ((void)0)
#define FTZ_OFF() ((void)0)
#endif

void prfaas_decode_struct_sizes(int64_t *out)
{
    out[0] = sizeof(lin_t);
    out[1] = sizeof(layer_t);
    out[2] = sizeof(model_t);
    out[3] = sizeof(step_t);
    out[4] = offsetof(layer_t, mixer);
    out[5] = offsetof(layer_t, theta);
    out[6] = offsetof(model_t, num_layers);
    out[7] = offsetof(step_t, B);
}

/* --- linear attention (Gated DeltaNet and KDA) ------------------------------------------------ */
static void conv_and_gates(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w)
{
    const int B = s->B, C = L->conv_dim, H = L->nv, rnd = m->act_bf16, ld = m->max_cols;
    const int per_channel = L->mixer == MIX_KDA;
    const size_t state_elems = (size_t)C * (L->conv_len - 1);
    const int per = (int)(((long)C + 63) / 64); /* channel blocks of 64 per sequence */
    long lo, hi;
    split((long)B * per, &lo, &hi);
    for (long i = lo; i < hi; i++) {
        const int b = (int)(i / per), c0 = (int)(i % per) * 64, c1 = c0 + 64 < C ? c0 + 64 : C;
        void *st = m->cache_bf16 ? (void *)((uint16_t *)L->conv_states + s->state_slots[b] * state_elems)
                                 : (void *)((float *)L->conv_states + s->state_slots[b] * state_elems);
        conv_step(w->p + (size_t)b * ld, L->conv_w, L->conv_len, st, m->cache_bf16, w->t1 + (size_t)b * ld, c0, c1,
                  rnd);
    }
    /* g (B, H) or (B, H, K) and beta (B, H) into t2, flat */
    float *g = w->t2, *beta = w->t2 + (size_t)B * H * (per_channel ? L->dk : 1);
    const int K = per_channel ? L->dk : 1;
    split((long)B * H, &lo, &hi);
    for (long i = lo; i < hi; i++) {
        const int b = (int)(i / H), h = (int)(i % H);
        const float *row = w->p + (size_t)b * ld;
        if (per_channel) { /* kda: a = f_b(f_a(x)) (in t3) + dt_bias; b after q|k|v|f_a */
            const float *a = w->t3 + (size_t)b * ld + (size_t)h * K;
            for (int k = 0; k < K; k++)
                g[i * K + k] = L->A[h] * softplusf(a[k] + L->dt_bias[h * K + k], 20.0f);
            beta[i] = sigmoidf(row[3 * H * K + K + h]);
        } else { /* gdn: b | a after q|k|v|z */
            const int off = 2 * L->nk * L->dk + 2 * H * L->dv;
            beta[i] = RND(rnd, sigmoidf(row[off + h]));
            g[i] = L->A[h] * softplusf(row[off + H + h] + L->dt_bias[h], 20.0f);
        }
    }
    BARRIER();
}

static void delta_and_norm(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w)
{
    const int B = s->B, H = L->nv, K = L->dk, V = L->dv, ld = m->max_cols, rnd = m->act_bf16;
    const int kda = L->mixer == MIX_KDA, key_dim = L->nk * K;
    const float *g = w->t2, *beta = w->t2 + (size_t)B * H * (kda ? K : 1);
    FOR_PAIRS(B, H, b, h0, h1, {
        const float *y = w->t1 + (size_t)b * ld;
        float *o = w->t4 + (size_t)b * H * V;
        const args_t a = {
            y, y + key_dim, y + 2 * key_dim, g + (size_t)b * H * (kda ? K : 1), beta + (size_t)b * H,
            0, 0, kda, 1, H, L->nk, 1, L->scale,
            L->rec_states + (size_t)s->state_slots[b] * H * K * V, o,
        };
        FTZ_ON();
        run(&a, h0, h1, K, V);
        FTZ_OFF();
        for (int h = h0; h < h1; h++) {
            float *oh = o + (size_t)h * V;
            for (int j = 0; j < V; j++) oh[j] = RND(rnd, oh[j]);
            const float *gate = kda ? w->t3 + (size_t)b * ld + H * K + (size_t)h * V /* g_b output */
                                    : w->p + (size_t)b * ld + 2 * key_dim + H * V + (size_t)h * V; /* z */
            gated_norm(oh, gate, V, L->head_norm_a, L->mixer_eps, !kda, rnd);
        }
    });
    BARRIER();
}

static void linear_mixer(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w)
{
    const int B = s->B, ld = m->max_cols, rnd = m->act_bf16;
    gemm(w->xn, m->D, &L->in_proj, w->p, ld, B, STORE, rnd);
    PROF(P_GEMM);
    if (L->mixer == MIX_KDA) { /* f_b(f_a(x)) and g_b(g_a(x)) into t3: [a (H*K) | gate (H*V)] */
        const int dim = L->nv * L->dk;
        const job_t jobs[2] = {
            {w->p + 3 * dim, ld, &L->second_a, w->t3, ld, B, STORE, rnd},
            {w->p + 3 * dim + L->dk + L->nv, ld, &L->second_b, w->t3 + dim, ld, B, STORE, rnd},
        };
        run_jobs(jobs, 2);
        PROF(P_GEMM);
    }
    conv_and_gates(m, L, s, w);
    PROF(P_CONV);
    delta_and_norm(m, L, s, w);
    PROF(P_DELTA);
    gemm(w->t4, (long)L->nv * L->dv, &L->out_proj, w->x, m->D, B, ACCUMULATE, rnd);
    PROF(P_GEMM);
}

/* --- full attention ------------------------------------------------------------------------------ */
static void gqa_mixer(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w)
{
    const int B = s->B, ld = m->max_cols, rnd = m->act_bf16, nh = L->nh, nkv = L->nkv, hd = L->hd;
    const int bs = m->block_size, cb = m->cache_bf16, group = nh / nkv;
    gemm(w->xn, m->D, &L->in_proj, w->p, ld, B, STORE, rnd);
    PROF(P_GEMM);
    /* q: normed and rotated into t1 (B, nh, hd); k, v: normed, rotated, stored at the new slot */
    long lo, hi;
    split((long)B * (nh + nkv), &lo, &hi);
    for (long i = lo; i < hi; i++) {
        const int b = (int)(i / (nh + nkv)), h = (int)(i % (nh + nkv));
        float cs[256], sn[256], tmp[1024];
        rotary_table(s->positions[b], L->rot, L->theta, rnd, cs, sn);
        const float *row = w->p + (size_t)b * ld;
        if (h < nh) {
            float *q = w->t1 + ((size_t)b * nh + h) * hd;
            rms_norm(row + (size_t)h * 2 * hd, q, hd, L->head_norm_a, L->mixer_eps, NORM_SCALE_AFTER, rnd);
            rotary(q, cs, sn, L->rot, rnd);
        } else {
            const int g = h - nh;
            rms_norm(row + (size_t)nh * 2 * hd + (size_t)g * hd, tmp, hd, L->head_norm_b, L->mixer_eps,
                     NORM_SCALE_AFTER, rnd);
            rotary(tmp, cs, sn, L->rot, rnd);
            const float *v = row + (size_t)nh * 2 * hd + (size_t)nkv * hd + (size_t)g * hd;
            const size_t at = ((size_t)kv_slot(s, b, bs) * nkv + g) * hd;
            for (int d = 0; d < hd; d++) {
                store_any(L->k_cache, at + d, cb, tmp[d]);
                store_any(L->v_cache, at + d, cb, v[d]);
            }
        }
    }
    BARRIER();
    PROF(P_ATTN_PREP);
    float *scores = w->scores + (size_t)thread_id() * s->max_ctx * m->max_heads;
    FOR_PAIRS(B, nh, b, h0, h1, {
        gqa_attend(w->t1 + (size_t)b * nh * hd, w->t4 + (size_t)b * nh * hd, h0, h1, group, hd, nkv, L->scale,
                   L->k_cache, L->v_cache, s->block_tables + (size_t)b * s->max_blocks, ctx_len(s, b), bs, cb, scores,
                   rnd);
        for (int h = h0; h < h1; h++) { /* the output gate */
            float *o = w->t4 + ((size_t)b * nh + h) * hd, act[1024];
            memcpy(act, w->p + (size_t)b * ld + (size_t)h * 2 * hd + hd, sizeof(float) * hd);
            sigmoid_row(act, hd);
            for (int d = 0; d < hd; d++) o[d] = RND(rnd, o[d] * RND(rnd, act[d]));
        }
    });
    BARRIER();
    PROF(P_ATTN);
    gemm(w->t4, (long)nh * hd, &L->out_proj, w->x, m->D, B, ACCUMULATE, rnd);
    PROF(P_GEMM);
}

static void mla_latents(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w, int qoff)
{
    const int R = L->rank, P = L->rope, ld = m->max_cols, cb = m->cache_bf16, rnd = m->act_bf16;
    long lo, hi;
    split(s->B, &lo, &hi);
    for (long b = lo; b < hi; b++) {
        const float *row = w->p + (size_t)b * ld + qoff;
        float lat[1024];
        rms_norm(row, lat, R, L->head_norm_b, L->mixer_eps, NORM_CAST_FIRST, rnd);
        for (int r = 0; r < P; r++) lat[R + r] = row[R + r];
        for (int c = 0; c < R + P; c++) store_any(L->k_cache, (size_t)kv_slot(s, (int)b, m->block_size) * (R + P) + c, cb, lat[c]);
        if (L->q_lora) rms_norm(w->p + (size_t)b * ld, w->t1 + (size_t)b * ld, L->q_lora, L->head_norm_a,
                                L->mixer_eps, NORM_CAST_FIRST, rnd);
    }
    BARRIER();
}

static void mla_mixer(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w)
{
    const int B = s->B, ld = m->max_cols, rnd = m->act_bf16, H = L->nh, R = L->rank, P = L->rope;
    const int qk = L->nope + P, C = R + P, qoff = L->q_lora ? L->q_lora : H * qk;
    gemm(w->xn, m->D, &L->in_proj, w->p, ld, B, STORE, rnd);
    PROF(P_GEMM);
    mla_latents(m, L, s, w, qoff);
    PROF(P_ATTN_PREP);
    const float *q = w->p;
    if (L->q_lora) {
        gemm(w->t1, ld, &L->second_a, w->t2, ld, B, STORE, rnd);
        q = w->t2;
    }
    job_t jobs[64];
    for (int h = 0; h < H; h++) /* q_lat = q_nope W_UK into t3 (B, H, R + P) */
        jobs[h] = (job_t){q + (size_t)h * qk, ld, &L->heads_a[h], w->t3 + (size_t)h * C, (long)H * C, B, STORE, rnd};
    long lo, hi;
    split((long)B * H, &lo, &hi);
    for (long i = lo; i < hi; i++) { /* q_rot, unrotated (NoPE) */
        const int b = (int)(i / H), h = (int)(i % H);
        memcpy(w->t3 + ((size_t)b * H + h) * C + R, q + (size_t)b * ld + (size_t)h * qk + L->nope, sizeof(float) * P);
    }
    run_jobs(jobs, H);
    PROF(P_GEMM);
    float *scores = w->scores + (size_t)thread_id() * s->max_ctx * m->max_heads;
    FOR_PAIRS(B, H, b, h0, h1, {
        mla_attend(w->t3 + (size_t)b * H * C, w->t4 + (size_t)b * H * R, h0, h1, R, P, L->scale, L->k_cache,
                   s->block_tables + (size_t)b * s->max_blocks, ctx_len(s, b), m->block_size, m->cache_bf16, scores,
                   rnd);
    });
    BARRIER();
    PROF(P_ATTN);
    for (int h = 0; h < H; h++) /* o = o_lat W_UV^T into t1 (B, H, v) */
        jobs[h] = (job_t){w->t4 + (size_t)h * R, (long)H * R, &L->heads_b[h], w->t1 + (size_t)h * L->vdim,
                          (long)H * L->vdim, B, STORE, rnd};
    run_jobs(jobs, H);
    gemm(w->t1, (long)H * L->vdim, &L->out_proj, w->x, m->D, B, ACCUMULATE, rnd);
    PROF(P_GEMM);
}

/* --- MLPs ---------------------------------------------------------------------------------------- */
#include "decode_moe.h"

/* --- the step ------------------------------------------------------------------------------------ */
static void layer_step(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w)
{
    long lo, hi;
    split(s->B, &lo, &hi);
    rms_rows(w->x, w->xn, m->D, m->D, L->norm1, m->eps, m->norm_mode, m->act_bf16, lo, hi);
    BARRIER();
    PROF(P_NORM);
    switch (L->mixer) {
    case MIX_GQA: gqa_mixer(m, L, s, w); break;
    case MIX_MLA: mla_mixer(m, L, s, w); break;
    default: linear_mixer(m, L, s, w); break;
    }
    rms_rows(w->x, w->xn, m->D, m->D, L->norm2, m->eps, m->norm_mode, m->act_bf16, lo, hi);
    BARRIER();
    PROF(P_NORM);
    mlp_step(m, L, s, w);
}

static void step_body(const model_t *m, const step_t *s, const bufs_t *w)
{
    const int B = s->B, D = m->D, rnd = m->act_bf16;
    long lo, hi;
    PROF_START();
    split(B, &lo, &hi);
    for (long b = lo; b < hi; b++)
        for (int d = 0; d < D; d++) w->x[b * D + d] = load_any(m->embed, (size_t)s->tokens[b] * D + d, rnd);
    BARRIER();
    PROF(P_OTHER);
    for (int i = 0; i < m->num_layers; i++) layer_step(m, &m->layers[i], s, w);
    rms_rows(w->x, w->xn, D, D, m->final_norm, m->eps, m->norm_mode, rnd, lo, hi);
    BARRIER();
    PROF(P_NORM);
    gemm(w->xn, D, &m->lm_head, s->logits, m->vocab, B, STORE, rnd);
    PROF(P_LM_HEAD);
    for (long b = lo; b < hi; b++) {
        const float *row = s->logits + (size_t)b * m->vocab;
        int64_t best = 0;
        for (int v = 1; v < m->vocab; v++)
            if (row[v] > row[best] || (row[v] != row[v] && row[best] == row[best])) best = v;
        s->argmax[b] = best;
    }
    BARRIER();
    PROF(P_OTHER);
}

static int carve(model_t *m, const step_t *s, bufs_t *w)
{
    const size_t B = (size_t)s->B, cols = (size_t)m->max_cols, rows = B * (size_t)(m->max_topk ? m->max_topk : 1);
    const size_t mc = (size_t)(m->max_moe_cols ? m->max_moe_cols : 1);
    const size_t scores = (size_t)s->nthreads * (size_t)s->max_ctx * (size_t)m->max_heads;
    const size_t need = 2 * B * m->D + 5 * B * cols + scores + 3 * rows * mc + rows + 3 * rows + m->max_experts + 1 + 64;
    if (need > m->ws_floats) {
        float *ws = (float *)realloc(m->ws, need * sizeof(float));
        if (!ws) return -1;
        m->ws = ws;
        m->ws_floats = need;
    }
    float *p = m->ws;
    w->x = p; p += B * m->D;
    w->xn = p; p += B * m->D;
    w->p = p; p += B * cols;
    w->t1 = p; p += B * cols;
    w->t2 = p; p += B * cols;
    w->t3 = p; p += B * cols;
    w->t4 = p; p += B * cols;
    w->scores = p; p += scores;
    w->xe = p; p += rows * mc;
    w->he = p; p += rows * mc;
    w->ye = p; p += rows * mc;
    w->route_w = p; p += rows;
    w->route_e = (int32_t *)p; p += rows;
    w->rows_of = (int32_t *)p; p += rows;
    w->row_token = (int32_t *)p; p += rows;
    w->expert_start = (int32_t *)p;
    return 0;
}

/* returns 0, or -1 when the workspace could not be allocated */
int prfaas_decode_step(model_t *m, const step_t *s)
{
    bufs_t w;
    if (s->B <= 0) return 0;
    if (carve(m, s, &w)) return -1;
#ifdef _OPENMP
#pragma omp parallel num_threads(s->nthreads > 0 ? s->nthreads : 1)
#endif
    step_body(m, s, &w);
    return 0;
}

void prfaas_decode_free(model_t *m)
{
    free(m->ws);
    m->ws = NULL;
    m->ws_floats = 0;
}

int prfaas_decode_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
