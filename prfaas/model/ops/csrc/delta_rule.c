/* The gated delta rule, recurrent form, for the CPU: one sequence, a range of value heads.
 *
 * Per head, with the state S (K x V) and the decay d = exp(g) (a scalar per head for Gated
 * DeltaNet, a K-vector for Kimi Delta Attention), each token does
 *
 *     S = diag(d) S;  delta = beta (v - S^T k);  S += k delta^T;  o = S^T (scale q)
 *
 * with q and k optionally L2-normalised first. Since S^T k after the decay is (d k)^T S, and
 * o = (d q)^T S + (q . k) delta, a token needs a = (d k)^T S and b = (d q)^T S from the state it
 * starts from, then one update of S. The update of token t and the reads for token t + 1 share
 * one pass over S: each row is rewritten and, while in registers, accumulated into the next
 * token's a and b. S (K x V floats) stays in L1 for the whole sequence. The common head sizes
 * are compiled with constant K and V, so that the accumulators live in vector registers; the
 * inner loops run over V and never reassociate a sum.
 *
 * Denormals: strong decays drive S towards zero through the denormal range, where x86 cores
 * run many times slower; flush-to-zero and denormals-are-zero are set for the duration of the
 * call on the calling thread only, and restored on return.
 */
#include <math.h>
#include <stddef.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define MAX_DIM 512
#define JB 16 /* columns of S per register block: one vector of 16 floats */

/* GCC / Clang vector extensions, scalars broadcast by the operators: one AVX-512 register where
   the CPU has them, two AVX registers (or four SSE ones) elsewhere */
typedef float vf __attribute__((vector_size(JB * sizeof(float))));
static inline vf loadv(const float *p) { vf x; __builtin_memcpy(&x, p, sizeof x); return x; }
static inline void storev(float *p, vf x) { __builtin_memcpy(p, &x, sizeof x); }

int prfaas_max_dim(void) { return MAX_DIM; }

typedef struct {
    const float *q, *k, *v, *g, *beta;
    long qk_stride, v_stride;
    int per_channel, T, H, Hk, l2norm;
    float scale;
    float *state, *out;
} args_t;

/* Token t of head h: normalised (and scaled) q and k, their dot product, the decay vector. */
static inline __attribute__((always_inline)) float prepare(
    const args_t *a, int t, int h, int hk, const int K, float *qn, float *kn, float *dec)
{
    const float *qt = a->q + (size_t)t * a->qk_stride + (size_t)hk * K;
    const float *kt = a->k + (size_t)t * a->qk_stride + (size_t)hk * K;
    float qs = a->scale, ks = 1.0f;
    if (a->l2norm) {
        float sq = 0.0f, sk = 0.0f;
        for (int i = 0; i < K; i++) {
            sq += qt[i] * qt[i];
            sk += kt[i] * kt[i];
        }
        qs = a->scale / sqrtf(sq + 1e-6f);
        ks = 1.0f / sqrtf(sk + 1e-6f);
    }
    float qk = 0.0f;
    for (int i = 0; i < K; i++) {
        qn[i] = qt[i] * qs;
        kn[i] = kt[i] * ks;
        qk += qn[i] * kn[i];
    }
    if (a->per_channel) {
        const float *gt = a->g + ((size_t)t * a->H + h) * K;
        for (int i = 0; i < K; i++) dec[i] = expf(gt[i]);
    } else {
        const float d = expf(a->g[(size_t)t * a->H + h]);
        for (int i = 0; i < K; i++) dec[i] = d;
    }
    return qk;
}

static inline __attribute__((always_inline)) void run_heads(const args_t *a, int h0, int h1, const int K, const int V)
{
    float qn[2][MAX_DIM], kn[2][MAX_DIM], dec[2][MAX_DIM], acc_a[2][MAX_DIM], acc_b[2][MAX_DIM], dlt[MAX_DIM];
    const int group = a->H / a->Hk;
    for (int h = h0; h < h1; h++) {
        const int hk = h / group;
        float *restrict S = a->state + (size_t)h * K * V;
        int cur = 0;
        float qk = prepare(a, 0, h, hk, K, qn[0], kn[0], dec[0]);
        for (int j = 0; j < V; j++) acc_a[0][j] = acc_b[0][j] = 0.0f;
        for (int i = 0; i < K; i++) {
            const float kd = kn[0][i] * dec[0][i], qd = qn[0][i] * dec[0][i];
            const float *restrict row = S + (size_t)i * V;
            for (int j = 0; j < V; j++) {
                acc_a[0][j] += kd * row[j];
                acc_b[0][j] += qd * row[j];
            }
        }
        for (int t = 0; t < a->T; t++) {
            const int nxt = cur ^ 1;
            const float bt = a->beta[(size_t)t * a->H + h];
            const float *restrict vt = a->v + (size_t)t * a->v_stride + (size_t)h * V;
            float *restrict ot = a->out + ((size_t)t * a->H + h) * V;
            for (int j = 0; j < V; j++) {
                dlt[j] = bt * (vt[j] - acc_a[cur][j]);
                ot[j] = acc_b[cur][j] + qk * dlt[j];
            }
            const int more = t + 1 < a->T;
            float qk_next = 0.0f;
            if (more) qk_next = prepare(a, t + 1, h, hk, K, qn[nxt], kn[nxt], dec[nxt]);
            float kd[MAX_DIM], qd[MAX_DIM];
            for (int i = 0; i < K; i++) {
                kd[i] = more ? kn[nxt][i] * dec[nxt][i] : 0.0f;
                qd[i] = more ? qn[nxt][i] * dec[nxt][i] : 0.0f;
            }
            if (V % JB == 0) {
                /* a block of JB columns at a time, down all K rows: the block's accumulators
                   and delta stay in vector registers, and each element is loaded and stored once */
                for (int j0 = 0; j0 < V; j0 += JB) {
                    vf va = {0}, vb = {0};
                    const vf dj = loadv(dlt + j0);
                    for (int i = 0; i < K; i++) {
                        float *row = S + (size_t)i * V + j0;
                        const vf sv = dec[cur][i] * loadv(row) + kn[cur][i] * dj;
                        storev(row, sv);
                        va += kd[i] * sv;
                        vb += qd[i] * sv;
                    }
                    storev(acc_a[nxt] + j0, va);
                    storev(acc_b[nxt] + j0, vb);
                }
            } else {
                for (int j = 0; j < V; j++) acc_a[nxt][j] = acc_b[nxt][j] = 0.0f;
                for (int i = 0; i < K; i++) {
                    const float di = dec[cur][i], ki = kn[cur][i];
                    float *restrict row = S + (size_t)i * V;
                    for (int j = 0; j < V; j++) {
                        const float s = di * row[j] + ki * dlt[j];
                        row[j] = s;
                        acc_a[nxt][j] += kd[i] * s;
                        acc_b[nxt][j] += qd[i] * s;
                    }
                }
            }
            qk = qk_next;
            cur = nxt;
        }
    }
}

static void run(const args_t *a, int h0, int h1, int K, int V)
{
    if (K == 64 && V == 64) run_heads(a, h0, h1, 64, 64);
    else if (K == 128 && V == 128) run_heads(a, h0, h1, 128, 128);
    else if (K == 128 && V == 64) run_heads(a, h0, h1, 128, 64);
    else if (K == 32 && V == 32) run_heads(a, h0, h1, 32, 32);
    else run_heads(a, h0, h1, K, V);
}

/* Prefill: the tokens of one sequence, value heads [h0, h1). */
void prfaas_delta_rule(
    const float *q, const float *k, long qk_stride, /* token t, key head h: q + t*qk_stride + h*K */
    const float *v, long v_stride,                   /* token t, value head h: v + t*v_stride + h*V */
    const float *g, int per_channel,                 /* (T, H) or (T, H, K), contiguous: log decay */
    const float *beta,                               /* (T, H), contiguous */
    float *state,                                    /* (H, K, V), contiguous, read and written */
    float *out,                                      /* (T, H, V), contiguous */
    int T, int H, int Hk, int K, int V, float scale, int l2norm, int h0, int h1)
{
    if (T <= 0) return;
#if defined(__SSE__)
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040); /* FTZ | DAZ */
#endif
    const args_t a = {q, k, v, g, beta, qk_stride, v_stride, per_channel, T, H, Hk, l2norm, scale, state, out};
    run(&a, h0, h1, K, V);
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
}

/* Decode: one token for each of B sequences, row b of the inputs, whose states sit in the pool
   `states` (num_slots, H, K, V) at slots[b]: read and updated in place, never gathered. */
void prfaas_delta_rule_decode(
    const float *q, const float *k, long qk_stride, const float *v, long v_stride,
    const float *g, int per_channel, const float *beta, float *states, const long *slots, float *out,
    int B, int H, int Hk, int K, int V, float scale, int l2norm)
{
#if defined(__SSE__)
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
#endif
    const size_t gsize = per_channel ? (size_t)H * K : (size_t)H;
    for (int b = 0; b < B; b++) {
        const args_t a = {
            q + (size_t)b * qk_stride, k + (size_t)b * qk_stride, v + (size_t)b * v_stride,
            g + (size_t)b * gsize, beta + (size_t)b * H, qk_stride, v_stride, per_channel, 1, H, Hk, l2norm,
            scale, states + (size_t)slots[b] * H * K * V, out + (size_t)b * H * V,
        };
        run(&a, 0, H, K, V);
    }
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
}
