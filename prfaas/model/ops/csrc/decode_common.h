/* Shared by the decode step's parts: bf16 conversion, the thread split, the structs that Python
 * fills (prfaas/model/fast_decode/plan.py mirrors them field by field; prfaas_decode_struct_sizes
 * lets it check).
 *
 * Rounding: with `act_bf16` set (a bf16 model) every value that the torch reference holds as a
 * bf16 tensor is rounded to bf16 at the same point (RND); the arithmetic between those points is
 * float32, as torch's own bf16 kernels do it. In float32 RND is the identity.
 */
#ifndef PRFAAS_DECODE_COMMON_H
#define PRFAAS_DECODE_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#define BARRIER() _Pragma("omp barrier")
static inline int thread_id(void) { return omp_get_thread_num(); }
static inline int num_threads(void) { return omp_get_num_threads(); }
#else
#define BARRIER() ((void)0)
static inline int thread_id(void) { return 0; }
static inline int num_threads(void) { return 1; }
#endif

#define PW 32 /* columns per packed weight panel: two vectors of JB floats */

static inline float bf16_to_f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                         /* round to nearest even */
    return (uint16_t)(u >> 16);
}
static inline float round_bf16(float f) { return bf16_to_f(f_to_bf16(f)); }
#define RND(on, v) ((on) ? round_bf16(v) : (v))

typedef uint16_t vh __attribute__((vector_size(JB * sizeof(uint16_t))));
typedef uint32_t vu __attribute__((vector_size(JB * sizeof(uint32_t))));
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vf load_bf16v(const uint16_t *p)
{
    const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (vf)_mm512_castsi512_ps(u);
}
#else
static inline vf load_bf16v(const uint16_t *p)
{
    vh h;
    __builtin_memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}
#endif

/* Vector math. vexp: e^x, Cody-Waite reduction and a degree-6 polynomial, within 2 ulp of expf
 * over the float range (inputs clamped to [-87.3, 88.7]: the results at the ends are 1.2e-38 and
 * 3.4e38, not 0 and inf). Elementwise activations go through it: one libm call per element was
 * the largest cost of the step's glue. */
typedef int32_t vi __attribute__((vector_size(JB * sizeof(int32_t))));
static inline vf vsplat(float c) { return (vf){0} + c; }
static inline vf vsel(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline vf vexp(vf x)
{
    x = vsel(x > vsplat(88.7f), vsplat(88.7f), x);
    x = vsel(x < vsplat(-87.3f), vsplat(-87.3f), x);
    const vf t = x * 1.44269504088896341f;
    const vi n = __builtin_convertvector(t + vsel(t < vsplat(0.0f), vsplat(-0.5f), vsplat(0.5f)), vi);
    const vf nf = __builtin_convertvector(n, vf);
    const vf r = x - nf * 0.693145751953125f - nf * 1.428606765330187045e-06f;
    vf p = vsplat(1.0f / 720.0f);
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return (vf)((vi)p + (n << 23));
}
static inline float hsum(vf v)
{
#if defined(__AVX512F__)
    return _mm512_reduce_add_ps((__m512)v);
#else
    float s = 0.0f;
    for (int j = 0; j < JB; j++) s += v[j];
    return s;
#endif
}

/* in place over n values: silu, sigmoid */
static inline void silu_row(float *x, int n)
{
    int i = 0;
    for (; i + JB <= n; i += JB) { const vf v = loadv(x + i); storev(x + i, v / (1.0f + vexp(-v))); }
    for (; i < n; i++) x[i] = x[i] / (1.0f + expf(-x[i]));
}
static inline void sigmoid_row(float *x, int n)
{
    int i = 0;
    for (; i + JB <= n; i += JB) storev(x + i, 1.0f / (1.0f + vexp(-loadv(x + i))));
    for (; i < n; i++) x[i] = 1.0f / (1.0f + expf(-x[i]));
}

/* a value of a tensor in float32 or bf16 storage */
static inline float load_any(const void *p, size_t i, int bf16)
{
    return bf16 ? bf16_to_f(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void store_any(void *p, size_t i, int bf16, float v)
{
    if (bf16) ((uint16_t *)p)[i] = f_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* [lo, hi) of n items for this thread */
static inline void split(long n, long *lo, long *hi)
{
    const long t = thread_id(), nt = num_threads();
    *lo = n * t / nt;
    *hi = n * (t + 1) / nt;
}

static inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float siluf(float x) { return x / (1.0f + expf(-x)); }
static inline float softplusf(float x, float threshold) { return x > threshold ? x : log1pf(expf(x)); }

/* A weight packed for y = x W^T: W (n, k) stored as ceil(n / PW) panels of (k, PW), columns
 * past n zero; float32 or bf16. `bias` (n) float32 or NULL. */
typedef struct {
    const void *w;
    const float *bias;
    int n, k, bf16, pad_;
} lin_t;

enum { MIX_GDN = 0, MIX_KDA = 1, MIX_GQA = 2, MIX_MLA = 3 };
enum { MLP_DENSE = 0, MLP_MOE_SOFTMAX = 1, MLP_MOE_SIGMOID = 2 };
enum { NORM_SCALE_AFTER = 0, NORM_CAST_FIRST = 1 }; /* see rms_norm */

typedef struct {
    /* mixer weights: `in_proj` reads the normed input, every fused projection of the mixer */
    lin_t in_proj, out_proj, second_a, second_b; /* second_*: kda f_b / g_b; mla q_b (second_a) */
    const lin_t *heads_a, *heads_b;              /* mla: W_UK^T and W_UV per head */
    const float *norm1, *norm2;                  /* input / post-attention RMSNorm (prepared) */
    const float *conv_w;                         /* (conv_dim, W) float32 */
    const float *A, *dt_bias;                    /* linear: -exp(A_log) (H); dt_bias (H) or (H * K) */
    const float *head_norm_a, *head_norm_b;      /* gated norm (V) | gqa q_norm, k_norm | mla q_a, kv_a */
    float *rec_states;                           /* (num_slots, H, K, V) float32 */
    void *conv_states;                           /* (num_slots, conv_dim, W - 1), cache dtype */
    void *k_cache, *v_cache;                     /* paged: (blocks, block_size, ...), cache dtype */
    /* mlp weights */
    lin_t mlp_in, mlp_down, router;              /* mlp_in: dense gate|up, or moe router|shared */
    const lin_t *experts_gu, *experts_down;      /* (E) each */
    const float *e_bias;                         /* sigmoid router's correction bias (E) */
    /* mixer sizes */
    int mixer, mlp;
    int nk, nv, dk, dv, conv_dim, conv_len;      /* linear: key/value heads and dims, conv */
    int nh, nkv, hd, rot;                        /* gqa: heads, kv heads, head dim, rotary dim */
    int rank, nope, rope, vdim, q_lora;          /* mla */
    int E, topk, inter, shared_inter, norm_topk, groups, topk_groups, has_shared_gate;
    float theta, scale, mixer_eps, scaling;
} layer_t;

typedef struct {
    const void *embed;         /* (vocab, D) in the model dtype */
    const float *final_norm;   /* (D) prepared */
    lin_t lm_head;
    const layer_t *layers;
    float *ws;                 /* workspace, grown by the step (C-owned) */
    size_t ws_floats;
    int num_layers, D, vocab, act_bf16, cache_bf16, norm_mode, block_size;
    int max_cols, max_heads, max_moe_cols, max_topk, max_experts;
    float eps;
} model_t;

typedef struct {
    const int64_t *tokens, *positions, *state_slots; /* (B) each; context = position + 1 tokens */
    const int32_t *block_tables; /* (B, max_blocks) */
    float *logits;               /* (B, vocab) out */
    int64_t *argmax;             /* (B) out */
    int B, max_blocks, max_ctx, nthreads;
} step_t;

/* the flat pool slot of sequence b's new token, and its context length (the new token included) */
static inline int64_t kv_slot(const step_t *s, int b, int bs)
{
    const int64_t p = s->positions[b];
    return (int64_t)s->block_tables[(size_t)b * s->max_blocks + p / bs] * bs + p % bs;
}
static inline int64_t ctx_len(const step_t *s, int b) { return s->positions[b] + 1; }

/* the step's scratch, carved from model_t.ws */
typedef struct {
    float *x, *xn, *p, *t1, *t2, *t3, *t4, *scores; /* p, t1..t4: (B, max_cols) */
    float *xe, *he, *ye;                          /* moe rows: (B * topk, max_moe_cols) */
    float *route_w;                               /* (B, topk) */
    int32_t *route_e, *rows_of, *row_token;       /* (B, topk); row of (b, j); token of a row */
    int32_t *expert_start;                        /* (E + 1): rows of expert e from [e] to [e + 1] */
} bufs_t;

#endif
