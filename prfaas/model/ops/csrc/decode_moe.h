/* The MLPs of the decode step: dense SwiGLU, and the two MoEs (Qwen3-Next's softmax router with a
 * gated shared expert; Kimi-Linear's sigmoid router with a correction bias, groups and a plain
 * shared expert). Routed experts run only on the tokens routed to them: the (token, choice) rows
 * are sorted by expert, each expert's rows are one product, every expert's products one job list. */
#ifndef PRFAAS_DECODE_MOE_H
#define PRFAAS_DECODE_MOE_H

#include "decode_common.h"
#include "decode_gemm.h"

/* the k largest of v (n), in descending order; ties to the lower index, as torch.topk on CPU */
static void top_k(const float *v, int n, int k, int32_t *idx)
{
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < n; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= idx[i] == e;
            if (!taken && (best < 0 || v[e] > v[best])) best = e;
        }
        idx[j] = best;
    }
}

/* Qwen3-Next: softmax over the (rounded) router logits, top k, renormalised, cast */
static void route_softmax(const layer_t *L, const float *logits, int32_t *idx, float *wt, int rnd)
{
    float p[512], mx = -INFINITY, sum = 0.0f;
    for (int e = 0; e < L->E; e++) mx = logits[e] > mx ? logits[e] : mx;
    for (int e = 0; e < L->E; e++) { p[e] = expf(logits[e] - mx); sum += p[e]; }
    for (int e = 0; e < L->E; e++) p[e] /= sum;
    top_k(p, L->E, L->topk, idx);
    float tot = 0.0f;
    for (int j = 0; j < L->topk; j++) tot += p[idx[j]];
    for (int j = 0; j < L->topk; j++) wt[j] = RND(rnd, L->norm_topk ? p[idx[j]] / tot : p[idx[j]]);
}

/* Kimi-Linear: sigmoid scores; choice = score + bias within the best groups (a group's score is
 * the sum of its two best); weights are the scores, renormalised, scaled, cast */
static void route_sigmoid(const layer_t *L, const float *logits, int32_t *idx, float *wt, int rnd)
{
    float sc[512], choice[512];
    const int E = L->E;
    for (int e = 0; e < E; e++) {
        sc[e] = sigmoidf(logits[e]);
        choice[e] = sc[e] + L->e_bias[e];
    }
    if (L->groups > 1) {
        const int per = E / L->groups;
        float gs[512];
        int32_t two[2], best[512];
        for (int g = 0; g < L->groups; g++) {
            const int m = per < 2 ? per : 2;
            top_k(choice + g * per, per, m, two);
            gs[g] = 0.0f;
            for (int i = 0; i < m; i++) gs[g] += choice[g * per + two[i]];
        }
        top_k(gs, L->groups, L->topk_groups, best);
        for (int g = 0; g < L->groups; g++) {
            int keep = 0;
            for (int i = 0; i < L->topk_groups; i++) keep |= best[i] == g;
            if (!keep)
                for (int e = 0; e < per; e++) choice[g * per + e] = -INFINITY;
        }
    }
    top_k(choice, E, L->topk, idx);
    float tot = 0.0f;
    for (int j = 0; j < L->topk; j++) tot += sc[idx[j]];
    for (int j = 0; j < L->topk; j++)
        wt[j] = RND(rnd, (L->norm_topk ? sc[idx[j]] / (tot + 1e-20f) : sc[idx[j]]) * L->scaling);
}

/* h = round(round(round(silu(g)) * u) * w), n values, gate and up side by side (g at 0, u at n) */
static inline void swiglu(const float *gu, float *h, int n, float w, int weighted, int rnd)
{
    memmove(h, gu, sizeof(float) * n);
    silu_row(h, n);
    for (int i = 0; i < n; i++) {
        const float v = RND(rnd, RND(rnd, h[i]) * gu[n + i]);
        h[i] = weighted ? RND(rnd, v * w) : v;
    }
}

/* every token's top-k, then (one thread) the rows sorted by expert */
static void route(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w, const float *logits,
                  long ld)
{
    const int B = s->B, k = L->topk;
    long lo, hi;
    split(B, &lo, &hi);
    for (long b = lo; b < hi; b++) {
        if (L->mlp == MLP_MOE_SOFTMAX)
            route_softmax(L, logits + b * ld, w->route_e + b * k, w->route_w + b * k, m->act_bf16);
        else
            route_sigmoid(L, logits + b * ld, w->route_e + b * k, w->route_w + b * k, m->act_bf16);
    }
    BARRIER();
    if (thread_id() == 0) {
        int32_t *start = w->expert_start;
        for (int e = 0; e <= L->E; e++) start[e] = 0;
        for (int r = 0; r < B * k; r++) start[w->route_e[r] + 1]++;
        for (int e = 0; e < L->E; e++) start[e + 1] += start[e];
        int32_t fill[512];
        for (int e = 0; e < L->E; e++) fill[e] = start[e];
        for (int r = 0; r < B * k; r++) { /* r = b * k + j */
            const int row = fill[w->route_e[r]]++;
            w->rows_of[r] = row;
            w->row_token[row] = r;
        }
    }
    BARRIER();
}

static void moe_step(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w)
{
    const int B = s->B, D = m->D, ld = m->max_cols, mc = m->max_moe_cols, rnd = m->act_bf16, k = L->topk;
    const int I = L->inter, Is = L->shared_inter, softmax = L->mlp == MLP_MOE_SOFTMAX;
    /* qwen: p = [router (E) | shared gate (1) | shared gate, up (2 Is)]; kimi: p = [shared gate, up],
       router logits (float32) into t2 */
    const int sh = softmax ? L->E + 1 : 0;
    const job_t first[2] = {
        {w->xn, D, &L->mlp_in, w->p, ld, B, STORE, rnd},
        {w->xn, D, &L->router, w->t2, ld, softmax ? 0 : B, STORE, 0},
    };
    run_jobs(first, 2);
    PROF(P_GEMM);
    route(m, L, s, w, softmax ? w->p : w->t2, ld);
    PROF(P_ROUTE);
    long lo, hi;
    split((long)B * k, &lo, &hi);
    for (long r = lo; r < hi; r++) /* row of (token b, choice j) gets x_b */
        memcpy(w->xe + (size_t)w->rows_of[r] * mc, w->xn + (r / k) * D, sizeof(float) * D);
    split(B, &lo, &hi);
    for (long b = lo; b < hi; b++)
        if (Is) swiglu(w->p + b * ld + sh, w->t1 + b * ld, Is, 0.0f, 0, rnd);
    BARRIER();
    PROF(P_MOE_GLUE);
    job_t jobs[1024];
    int n = 0;
    for (int e = 0; e < L->E; e++) {
        const int r0 = w->expert_start[e], rows = w->expert_start[e + 1] - r0;
        if (rows) jobs[n++] = (job_t){w->xe + (size_t)r0 * mc, mc, &L->experts_gu[e], w->he + (size_t)r0 * mc, mc,
                                      rows, STORE, rnd};
    }
    run_jobs(jobs, n);
    PROF(P_GEMM);
    split((long)B * k, &lo, &hi);
    for (long r = lo; r < hi; r++) {
        const int row = w->rows_of[r];
        swiglu(w->he + (size_t)row * mc, w->xe + (size_t)row * mc, I, w->route_w[r], 1, rnd);
    }
    BARRIER();
    PROF(P_MOE_GLUE);
    n = 0;
    for (int e = 0; e < L->E; e++) {
        const int r0 = w->expert_start[e], rows = w->expert_start[e + 1] - r0;
        if (rows) jobs[n++] = (job_t){w->xe + (size_t)r0 * mc, mc, &L->experts_down[e], w->ye + (size_t)r0 * mc, mc,
                                      rows, STORE, 0};
    }
    if (Is) jobs[n++] = (job_t){w->t1, ld, &L->mlp_down, w->t3, ld, B, STORE, rnd};
    run_jobs(jobs, n);
    PROF(P_GEMM);
    split(B, &lo, &hi);
    for (long b = lo; b < hi; b++) {
        float *x = w->x + b * D;
        const float *shared = w->t3 + b * ld;
        const float gate = softmax && Is ? RND(rnd, sigmoidf(w->p[b * ld + L->E])) : 1.0f;
        for (int d = 0; d < D; d++) {
            float acc = 0.0f;
            for (int j = 0; j < k; j++) acc += w->ye[(size_t)w->rows_of[b * k + j] * mc + d];
            float out = RND(rnd, acc);
            if (Is) out = RND(rnd, out + (softmax ? RND(rnd, gate * shared[d]) : shared[d]));
            x[d] = RND(rnd, x[d] + out);
        }
    }
    BARRIER();
    PROF(P_MOE_GLUE);
}

static void mlp_step(const model_t *m, const layer_t *L, const step_t *s, const bufs_t *w)
{
    if (L->mlp != MLP_DENSE) {
        moe_step(m, L, s, w);
        return;
    }
    const int B = s->B, ld = m->max_cols, rnd = m->act_bf16;
    gemm(w->xn, m->D, &L->mlp_in, w->p, ld, B, STORE, rnd);
    PROF(P_GEMM);
    long lo, hi;
    split(B, &lo, &hi);
    for (long b = lo; b < hi; b++) swiglu(w->p + b * ld, w->t1 + b * ld, L->inter, 0.0f, 0, rnd);
    BARRIER();
    PROF(P_MOE_GLUE);
    gemm(w->t1, ld, &L->mlp_down, w->x, m->D, B, ACCUMULATE, rnd);
    PROF(P_GEMM);
}

#endif
