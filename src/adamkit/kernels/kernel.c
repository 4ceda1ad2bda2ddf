/* The native kernel: one pass over a step's tensors, where they lie.
 *
 * It composes the same three layers as the Python backends, element by element:
 *   decode (storage -> fp32)  ->  an algorithm's update (optim/<name>.py)  ->  encode (fp32 -> storage)
 * with the same operations in the same order (compiled with -ffp-contract=off, so no multiply-add
 * is fused where the reference rounds twice; where the reference calls a fused operation, such as
 * torch's lerp or add(alpha=), the body calls fmaf). fp32 results equal the reference backend's
 * except where torch's vectorized square root differs from sqrtf in the last bit. The reference
 * backend stays the spec; tests hold this kernel to it.
 *
 * The caller passes a table: one row per tensor (its length, the optimizer's own state buffers and
 * a stable id that seeds its rounding streams) plus, per step, the parameter and gradient pointers
 * of each row. Parameters and gradients are read and written where the user keeps them; nothing
 * is copied into buffers of ours. Rounding bits of element i of a tensor come from (step, id, i),
 * i its position in the whole tensor (a shard's offset added), exactly as the reference backend
 * draws them, so every path and every world size rounds alike.
 *
 * Why C and not only torch.compile: (1) 8-bit groups. Each tile of up to 256 elements (whole
 * groups of 32) is decoded, updated and re-encoded while it sits in L1 (a group's new scale needs
 * the whole group first), so memory is read and written once. (2) bf16 values move as 16-bit integers with shifts. (3) Start-up: a few
 * hundred lines of C build in about two seconds, once per machine, and load in milliseconds.
 *
 * Bytes per element: param 4 (fp32) or 2 (bf16); grad the same; kahan_comp 2 (bf16);
 * kahan_comp8 1 (int8); master_weight 4; each state slot 4 (fp32), 2 (bf16) or 1 + 2/32 (8-bit codes + bf16 group scales).
 */
#include <math.h>
#include <float.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GET_FP_MODE() _mm_getcsr()
#define SET_FP_MODE(m) _mm_setcsr(m)
#else /* elsewhere threads start with the default floating-point mode */
#define GET_FP_MODE() 0u
#define SET_FP_MODE(m) ((void)(m))
#endif

#define AI inline __attribute__((always_inline))

enum { P_NATIVE = 0, P_PLAIN = 1, P_KAHAN = 2, P_SR = 3, P_MASTER = 4, P_KAHAN8 = 5 };
enum { S_FP32 = 0, S_BF16 = 1, S_8BIT = 2 };
/* Scalars: hp[0] is the gradient's sign (-1 to maximize) for every algorithm, then the
 * algorithm's own, in the order of its Scalars tuple (optim/adam.py, optim/lion.py). The
 * algorithms themselves are listed once, in ALGORITHMS (after their bodies). */
enum { GRAD_SIGN = 0 };
enum { A_L2 = 1, A_DECAY, A_OMB1, A_BETA2, A_OMB2, A_EPS, A_STEP_SIZE, A_BC2_SQRT, A_N,
       A_INV_BC2_SQRT = A_N /* the kernel's own: 1/BC2_SQRT rounded to nearest */ };
enum { L_DECAY = 1, L_LR, L_BETA1, L_OMB1, L_BETA2, L_OMB2 };
enum { D_L2 = 1, D_DECAY, D_OMB1, D_BETA2, D_OMB2, D_EPS, D_NEG_LR, D_CLIP };
enum { E_L2 = 1, E_DECAY, E_OMB1, E_BETA2, E_OMB2, E_OMB3, E_EPS, E_BC1, E_BC2_SQRT, E_ALPHA, E_LR };
enum { F_BETA2 = 1, F_OMB2, F_BC2, F_EPS, F_DECAY, F_CKP1, F_YCOEF, F_NEG_LR };
#define N_HP 16

#define TILE 256 /* elements decoded, updated and encoded together (in L1) */
#define GROUP 32  /* 8-bit codes share one bf16 scale per group (storage/quant8.py, BLOCK) */
#define MAX_SLOTS 3

typedef struct {         /* one tensor; the optimizer's own buffers (fixed while its state lives) */
    int64_t n;           /* elements */
    int64_t uid;         /* seeds the tensor's rounding streams */
    void *aux;           /* kahan_comp (bf16), kahan_comp8 (int8) or master_weight (fp32), else NULL */
    void *slot[MAX_SLOTS];   /* state slots: fp32, bf16 or uint8 codes (padded to whole groups) */
    uint16_t *scale[MAX_SLOTS]; /* 8-bit group scales (bf16), else NULL */
    int64_t len;         /* row length: 8-bit codes are rows of ``len`` elements, each padded to whole
                          * groups (storage/quant8.py, rows), so groups never cross a row; n otherwise */
    int64_t index0;      /* the first element's position in the whole tensor (a shard's offset):
                          * element e is rounded with the bits of index0 + e */
} row_t;

/* A row's work space: its elements, each 8-bit row padded to whole groups (the codes' layout). */
static inline int64_t space(const row_t *R) {
    return R->len >= R->n ? R->n : R->n / R->len * ((R->len + GROUP - 1) / GROUP * GROUP);
}

typedef struct {
    int64_t nrows;             /* rows to step */
    const int64_t *sel;        /* their indices in ``rows``, or NULL for rows 0 .. nrows-1 */
    const row_t *rows;
    void *const *param;        /* per row of ``rows``: the parameter (user's memory) */
    const void *const *grad;   /* per row of ``rows``: its gradient */
    float hp[N_HP];
    int64_t step;              /* the step number: seeds the rounding streams */
    int32_t alg, pmode, sfmt, nslots, ams, skip, nthreads; /* ams: the optional slot is kept */
    int32_t signs;             /* bit k: slot k holds values of both signs (8-bit: signed codes),
                                * from the algorithm's slot declarations (algorithm.py, Slot) */
    int32_t cautious;          /* the cautious mask (algorithm.py, caution): a counting pass first */
    int32_t fp32_slots;        /* bit k: slot k is fp32 whatever sfmt (a copy of the weights,
                                * algorithm.py, Slot.weights: Schedule-Free's z) */
    void *omp_parallel;        /* GOMP_parallel of torch's OpenMP runtime, or NULL */
} args_t;

/* The layout the Python side mirrors (kernels/native.py, Row and Args), checked when it loads a
 * library: a stale or foreign build is refused instead of reading fields at the wrong offsets. */
#define ABI_VERSION 6

/* ---- storage: bf16 and rounding ------------------------------------------------------------ */

static inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static inline float bf16_to_f(uint16_t h) { return u2f((uint32_t)h << 16); }

/* Rounding bits: the top 16 bits of a Weyl sequence, h(index) = index * WEYL + seed (mod 2^32),
 * as storage/formats.py, hash_bits. Loops start from h(first index) and add WEYL per element: vectorized, an
 * induction variable costs one add where index * WEYL costs a multiply per element (5-8 % of a
 * bf16 + Kahan step). */
#define WEYL 0x9E3779B1u
static inline uint32_t weyl(uint32_t index, uint32_t seed) { return index * WEYL + seed; }

/* round to nearest even, nan -> quiet nan (torch's float -> bfloat16) */
static inline uint16_t f_to_bf16_rne(float x) {
    uint32_t u = f2u(x);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return x != x ? (uint16_t)0x7FC0 : (uint16_t)r;
}

/* stochastic rounding (storage/formats.py, round_bf16_stochastic) with h = weyl(index, seed);
 * nan -> quiet nan (a nan with an all-ones payload would otherwise wrap to +0) */
static inline uint16_t f_to_bf16_sr(float x, uint32_t h) {
    const uint16_t r = (uint16_t)((f2u(x) + (h >> 16)) >> 16);
    return x != x ? (uint16_t)0x7FC0 : r;
}

/* kahan8 (storage/formats.py, kahan8_units): the int8 correction's unit u = ulp(p) / 256 =
 * 2^(E - 142) and its inverse, from the bf16 exponent field E; ok where p is finite and E >= 16 */
#define KAHAN8_MIN_EXP 16
static inline int k8_exp(uint16_t h) { return (h >> 7) & 0xFF; }
static inline float k8_unit(int e) { return u2f((uint32_t)(e - 15 < 1 ? 1 : (e - 15 > 254 ? 254 : e - 15)) << 23); }
static inline float k8_inv(int e) { return u2f((uint32_t)(269 - e < 1 ? 1 : (269 - e > 254 ? 254 : 269 - e)) << 23); }

/* ---- seeds: storage/formats.py, mix_seed(step, uid, k), murmur3's finalizer ------------------------------ */

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    return h ^ (h >> 16);
}
static inline uint32_t mix_seed(int64_t step, int64_t uid, int64_t k) {
    uint32_t h = 0x9E3779B9u;
    h = fmix32((h ^ (uint32_t)step) + 0x7F4A7C15u);
    h = fmix32((h ^ (uint32_t)uid) + 0x7F4A7C15u);
    return fmix32((h ^ (uint32_t)k) + 0x7F4A7C15u);
}

/* ---- the algorithms' bodies: one element, fp32 values in and out --------------------------- */

/* x / BC2_SQRT, correctly rounded, without a division: q = x * (1/b) is within an ulp of x/b, and
 * one correction q + (x - q*b) * (1/b), with the remainder exact in an FMA, rounds to exactly
 * RN(x/b) when 1/b is itself rounded to nearest (Markstein's theorem; no underflow can occur here,
 * as x = sqrt(v) and b in (0, 1]). The divider bounds the step where compute does (bf16 and 8-bit
 * formats); this takes one of its three operations per element off it. Non-finite x keeps the
 * plain product (inf stays inf, nan stays nan), as the division would. */
static AI float div_bc2(float x, const float *hp) {
#ifdef FP_FAST_FMAF
    const float q = x * hp[A_INV_BC2_SQRT];
    const float c = fmaf(fmaf(-q, hp[A_BC2_SQRT], x), hp[A_INV_BC2_SQRT], q);
    return fabsf(q) <= FLT_MAX ? c : q;
#else /* no fused multiply-add in hardware: fmaf would be a slow library call */
    return x / hp[A_BC2_SQRT];
#endif
}

/* torch's vectorized lerp(a, b, w): one fused multiply-add from whichever end is nearer */
static AI float lerp(float a, float b, float w) {
    const int small = fabsf(w) < 0.5f;
    return fmaf(small ? w : w - 1.0f, b - a, small ? a : b);
}

/* Each body: one element, fp32 values in and out: p, g (sign and multiplier applied), the slots
 * s[0..] in the order the algorithm declares them, its scalars hp, ``opt``: its optional slot is
 * kept; ``cau``: the cautious mask is on, ``cs`` its tensor's factor, ``*hit`` set where the
 * element keeps its component (the counting pass). ``*_prepare``: scalars the kernel derives once
 * per step (no_prepare: none). */
static AI void no_prepare(float *hp) { (void)hp; }

/* algorithm.py, caution: a * (a b > 0 ? n / (kept + 1) : 0), one rounding (nan stays nan) */
static AI float caution(float a, float b, const int cau, const float cs, int *hit) {
    if (!cau) return a;
    *hit = a * b > 0.0f;
    return a * (*hit ? cs : 0.0f);
}
#define BODY_ARGS float *p, float g, float *s, const float *hp, const int opt, const int cau, const float cs, int *hit

/* Adam (optim/adam.py, adam_update): s = (m, v, max v) */
static AI void adam_prepare(float *hp) { hp[A_INV_BC2_SQRT] = 1.0f / hp[A_BC2_SQRT]; }
static AI void adam(BODY_ARGS) {
    const int ams = opt;
    /* torch's grad.add(p, alpha=wd): one rounding; skipped without L2 decay, where 0 * p would
     * turn an inf parameter's gradient into nan (torch leaves it inf) */
    if (hp[A_L2] != 0.0f) g = fmaf(*p, hp[A_L2], g);
    const float np = *p * hp[A_DECAY];
    const float m = lerp(s[0], g, hp[A_OMB1]);
    const float v = s[1] * hp[A_BETA2] + (g * g) * hp[A_OMB2];
    float vv = v;
    if (ams) {
        const float x = s[2];
        s[2] = (x > v || x != x) ? x : v; /* torch.maximum: nan wins */
        vv = s[2];
    }
    const float denom = div_bc2(sqrtf(vv), hp) + hp[A_EPS];
    *p = np - (caution(m, g, cau, cs, hit) / denom) * hp[A_STEP_SIZE];
    s[0] = m;
    s[1] = v;
}

/* Lion (optim/lion.py, lion_update): s = (m) */
static AI void lion(BODY_ARGS) {
    (void)opt;
    const float m = s[0];
    const float c = m * hp[L_BETA1] + g * hp[L_OMB1];
    const float sg = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : c); /* sign: 0 -> 0, nan -> nan (lion_update) */
    *p = *p * hp[L_DECAY] - caution(sg, g, cau, cs, hit) * hp[L_LR];
    s[0] = m * hp[L_BETA2] + g * hp[L_OMB2];
}

/* ADOPT (optim/adopt.py, adopt_update): s = (m, v); the first step's scalars keep m and p */
static AI void adopt(BODY_ARGS) {
    (void)opt;
    if (hp[D_L2] != 0.0f) g = fmaf(*p, hp[D_L2], g);
    const float np = *p * hp[D_DECAY];
    const float r = sqrtf(s[1]);
    float n = g / (r < hp[D_EPS] ? hp[D_EPS] : r); /* clamp_min: nan stays nan */
    n = n < -hp[D_CLIP] ? -hp[D_CLIP] : (n > hp[D_CLIP] ? hp[D_CLIP] : n);
    const float m = lerp(s[0], n, hp[D_OMB1]);
    *p = fmaf(caution(m, n, cau, cs, hit), hp[D_NEG_LR], np);
    s[0] = m;
    s[1] = s[1] * hp[D_BETA2] + (g * g) * hp[D_OMB2];
}

/* AdEMAMix (optim/ademamix.py, ademamix_update): s = (m1, v, m2) */
static AI void ademamix(BODY_ARGS) {
    (void)opt;
    if (hp[E_L2] != 0.0f) g = fmaf(*p, hp[E_L2], g);
    const float np = *p * hp[E_DECAY];
    const float m1 = lerp(s[0], g, hp[E_OMB1]), m2 = lerp(s[2], g, hp[E_OMB3]);
    const float v = s[1] * hp[E_BETA2] + (g * g) * hp[E_OMB2];
    const float u = fmaf(m2, hp[E_ALPHA], caution(m1, g, cau, cs, hit) / hp[E_BC1]);
    *p = np - (u / (sqrtf(v) / hp[E_BC2_SQRT] + hp[E_EPS])) * hp[E_LR];
    s[0] = m1;
    s[1] = v;
    s[2] = m2;
}

/* Schedule-Free AdamW (optim/schedule_free.py, schedule_free_update): s = (z, v), p holds y */
static AI void schedule_free(BODY_ARGS) {
    (void)opt, (void)cau, (void)cs, (void)hit;
    const float z = s[0];
    const float v = s[1] * hp[F_BETA2] + (g * g) * hp[F_OMB2];
    float gn = g / (sqrtf(v / hp[F_BC2]) + hp[F_EPS]);
    if (hp[F_DECAY] != 0.0f) gn = fmaf(*p, hp[F_DECAY], gn); /* the decay at y */
    *p = fmaf(gn, hp[F_YCOEF], lerp(*p, z, hp[F_CKP1]));
    s[0] = fmaf(gn, hp[F_NEG_LR], z);
    s[1] = v;
}

/* The algorithms, each once: X(id, body, prepare, slots at most, slots of its common case, the
 * formats its common case gets loops of their own for, those its cautious form gets: its two
 * passes, NO_FORMATS where it has none). Its id is its position here, looked up by its body's name
 * (``adamkit_algorithm``, the ``native`` of its declaration, algorithm.py). A new elementwise
 * algorithm is its scalar indices (above), its body (above) and its row here. */
#define ALGORITHMS(X)                                                                            \
    X(ALG_ADAM, adam, adam_prepare, 3, 2, ALL_FORMATS, CAUTIOUS_FORMATS)                          \
    X(ALG_LION, lion, no_prepare, 1, 1, FAST_FORMATS, CAUTIOUS_FORMATS)                          \
    X(ALG_ADOPT, adopt, no_prepare, 2, 2, FAST_FORMATS, CAUTIOUS_FORMATS)                        \
    X(ALG_ADEMAMIX, ademamix, no_prepare, 3, 3, FAST_FORMATS, CAUTIOUS_FORMATS)                  \
    X(ALG_SCHEDULE_FREE, schedule_free, no_prepare, 2, 2, FAST_FORMATS, NO_FORMATS)
#define ALG_ID(ID, ...) ID,
enum { ALGORITHMS(ALG_ID) N_ALGS };
#define ALG_MAX_SLOTS(ID, FN, PREP, MAXS, ...) MAXS,
static const int max_slots_of[N_ALGS] = {ALGORITHMS(ALG_MAX_SLOTS)};

/* One element: the engine's part (skip_nonfinite, maximize) around the algorithm's body.
 * s0, s1, s2 point at the element's fp32 slot values (only the first ``ns`` are read). ``cau``:
 * the cautious mask with factor ``cs``; ``counting``: the first pass, which stores nothing and
 * returns whether the element keeps its component. */
static AI int element(const int alg, float *restrict pp, float g, float *restrict s0, float *restrict s1,
                      float *restrict s2, const float *restrict hp, const int ns, const int ams,
                      const int skip, const int cau, const float cs, const int counting) {
    const float p0 = *pp;
    const float o0 = *s0, o1 = ns > 1 ? *s1 : 0.0f, o2 = ns > 2 ? *s2 : 0.0f;
    float p = p0, s[MAX_SLOTS] = {o0, o1, o2};
    int hit = 0;
    const int ok = fabsf(g) <= FLT_MAX;
    if (skip) g = ok ? g : 0.0f;
    g = g * hp[GRAD_SIGN];
    switch (alg) { /* alg is a constant where this is inlined: one body remains */
#define ALG_BODY(ID, FN, ...) case ID: FN(&p, g, s, hp, ams, cau, cs, &hit); break;
        ALGORITHMS(ALG_BODY)
    }
    if (counting) return hit;
    if (skip) {
        p = ok ? p : p0;
        s[0] = ok ? s[0] : o0;
        s[1] = ok ? s[1] : o1;
        s[2] = ok ? s[2] : o2;
    }
    *pp = p;
    *s0 = s[0];
    if (ns > 1) *s1 = s[1];
    if (ns > 2) *s2 = s[2];
    return 0;
}

/* ---- 8-bit groups: storage/quant8.py, decode_blocks / encode_blocks / floor_pairs ------------------- */

#define QM 127
#define QV 254

/* ``ng`` groups of codes and their bf16 scales -> ng * GROUP values. The groups' factors are
 * spread over the elements first, so the decoding is one loop over the tile, not one per group. */
static inline __attribute__((always_inline)) void
decode8(const uint8_t *restrict c, const uint16_t *restrict scale, const int ng, float *restrict x,
        const int sgn) {
    float K[TILE];
    const float unit = sgn ? (float)(1.0 / (QM * QM)) : (float)(1.0 / ((double)QV * QV * QV * QV));
    for (int j = 0; j < ng; j++) {
        const float k = bf16_to_f(scale[j]) * unit;
        for (int i = 0; i < GROUP; i++) K[j * GROUP + i] = k;
    }
    const int n = ng * GROUP;
    if (sgn) {
        for (int i = 0; i < n; i++) {
            const float q = (float)c[i] - 128.0f;
            const float y = (q * fabsf(q)) * K[i];
            x[i] = c[i] == 0 ? NAN : y;
        }
    } else {
        for (int i = 0; i < n; i++) {
            const float q = (float)c[i];
            const float q2 = q * q;
            const float y = (q2 * q2) * K[i];
            x[i] = c[i] == 255 ? NAN : y;
        }
    }
}

/* ``ng`` groups: each group's scale (its largest finite magnitude rounded up to bf16), then every
 * code, rounded stochastically in the linear domain (one loop over the tile). ``nz`` (unsigned
 * slots): elements whose signed codes are not zero; their unsigned code is at least 1 (no m / eps;
 * all zeros where no signed slot was encoded). */
static inline __attribute__((always_inline)) void
encode8(const float *restrict x, uint8_t *restrict c, uint16_t *restrict scale, const int ng,
        uint32_t index0, uint32_t seed, const int sgn, const uint8_t *restrict nz) {
    float INV[TILE];
    for (int j = 0; j < ng; j++) {
        /* non-negative floats order like their bit patterns, and an integer max reduction
         * vectorizes where a float one (not associative with nan) would not */
        uint32_t amax = 0;
#pragma omp simd reduction(max : amax)
        for (int i = 0; i < GROUP; i++) {
            const float ax = fabsf(x[j * GROUP + i]);
            const uint32_t m = ax <= FLT_MAX ? f2u(ax) : 0u;
            amax = amax > m ? amax : m;
        }
        /* a subnormal largest magnitude (below 2^-126) makes the group zeros, as the reference
         * does: 1/a would overflow and turn the group's zeros into nan where subnormals are kept */
        uint32_t up = amax < 0x00800000u ? 0u : (amax + 0xFFFFu) & 0xFFFF0000u;
        up = up > 0x7F7F0000u ? 0x7F7F0000u : up; /* bf16's largest finite */
        scale[j] = (uint16_t)(up >> 16);
        const float a = u2f(up);
        const float inv = a > 0.0f ? 1.0f / a : 0.0f;
        for (int i = 0; i < GROUP; i++) INV[j * GROUP + i] = inv;
    }
    const int n = ng * GROUP;
    uint32_t h = weyl(index0, seed);
    if (sgn) {
        const float k = (float)(1.0 / (QM * QM));
        for (int i = 0; i < n; i++) {
            const int fin = fabsf(x[i]) <= FLT_MAX;
            const float r = (fin ? fabsf(x[i]) : 0.0f) * INV[i];
            float q = floorf(sqrtf(r) * (float)QM);
            q = q < (float)(QM - 1) ? q : (float)(QM - 1);
            const float lo = q * q * k, hi = (q + 1.0f) * (q + 1.0f) * k;
            const float u = (float)(h >> 16) * (1.0f / 65536.0f);
            h += WEYL;
            q = q + (u * (hi - lo) < r - lo ? 1.0f : 0.0f);
            const float s = x[i] < 0.0f ? 128.0f - q : 128.0f + q;
            c[i] = fin ? (uint8_t)(int32_t)s : (uint8_t)0;
        }
    } else {
        const float k = (float)(1.0 / ((double)QV * QV * QV * QV));
        for (int i = 0; i < n; i++) {
            const int fin = fabsf(x[i]) <= FLT_MAX;
            const float r = (fin ? fabsf(x[i]) : 0.0f) * INV[i];
            float q = floorf(sqrtf(sqrtf(r)) * (float)QV);
            q = q < (float)(QV - 1) ? q : (float)(QV - 1);
            const float q2 = q * q, d2 = (q + 1.0f) * (q + 1.0f);
            const float lo = q2 * q2 * k, hi = d2 * d2 * k;
            const float u = (float)(h >> 16) * (1.0f / 65536.0f);
            h += WEYL;
            q = q + (u * (hi - lo) < r - lo ? 1.0f : 0.0f);
            q = (nz[i] && q == 0.0f) ? 1.0f : q;
            c[i] = fin ? (uint8_t)(int32_t)q : (uint8_t)255;
        }
    }
}

/* ---- a piece of one tensor ------------------------------------------------------------------ */

typedef struct {
    const args_t *A;
    float hp[N_HP];  /* a local copy, with the kernel's own scalars (no store can alias it) */
    /* the cautious mask: per selected row, its factor n / (kept + 1) and, in the counting pass
     * (``counting``), the elements that keep their component; NULL without the mask */
    const float *cs;
    int64_t *counts;
    int counting;
} ctx_t;

static void make_ctx(const args_t *A, ctx_t *C) {
    C->A = A;
    memcpy(C->hp, A->hp, sizeof A->hp);
    switch (A->alg) {
#define ALG_PREPARE(ID, FN, PREP, ...) case ID: PREP(C->hp); break;
        ALGORITHMS(ALG_PREPARE)
    }
}

/* fp32 parameters and state: straight from memory to memory (Adam: 28 B per element) */
static AI int64_t piece_fp32(const ctx_t *C, const int alg, const row_t *R, float *restrict p,
                             const float *restrict g, int64_t a, int64_t b, const int ns, const int ams,
                             const int skip, const int cau, const float cs, const int counting) {
    float *restrict s0 = (float *)R->slot[0] + a;
    float *restrict s1 = ns > 1 ? (float *)R->slot[1] + a : s0;
    float *restrict s2 = ns > 2 ? (float *)R->slot[2] + a : s0;
    p += a;
    g += a;
    const int64_t n = b - a;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++)
        kept += element(alg, p + i, g[i], s0 + i, s1 + i, s2 + i, C->hp, ns, ams, skip, cau, cs, counting);
    return kept;
}

/* One tile of ``len`` elements starting at element e of a tensor, at position t of its work space
 * (``space``: where its 8-bit codes lie; t == e but in rows): decoded into L1 tiles, updated,
 * encoded back. ``len`` is TILE except at a row's or a share's end; full tiles are inlined with
 * the constant, so their loops vectorize without remainders. 8-bit codes cover ``len`` rounded up
 * to whole groups (a row's last group is padded). */
static AI int64_t tile(const ctx_t *C, const int alg, const row_t *R, void *param, const void *grad,
                       const int64_t t, const int64_t e, const int len, const uint32_t *seed, const int pm,
                       const int sf, const int ns, const int ams, const int skip, const int cau, const float cs,
                       const int counting) {
    float P[TILE], G[TILE], S[MAX_SLOTS][TILE];
    const int ng = (len + GROUP - 1) / GROUP; /* 8-bit groups */
    const uint32_t i0 = (uint32_t)(R->index0 + e);
    /* the parameter and gradient as fp32: fp32 parameters and master weights in place */
    float *restrict pv = pm == P_NATIVE ? (float *)param + e : (pm == P_MASTER ? (float *)R->aux + e : P);
    const float *restrict gv = pm == P_NATIVE ? (const float *)grad + e : G;
    if (pm != P_NATIVE) {
        const uint16_t *ps = (const uint16_t *)param + e, *gs = (const uint16_t *)grad + e;
        if (pm == P_KAHAN) {
            const uint16_t *cs = (const uint16_t *)R->aux + e;
            for (int i = 0; i < len; i++) P[i] = bf16_to_f(ps[i]) + bf16_to_f(cs[i]);
        } else if (pm == P_KAHAN8) { /* p + q * u(p), exact */
            const int8_t *qs = (const int8_t *)R->aux + e;
            for (int i = 0; i < len; i++) P[i] = bf16_to_f(ps[i]) + (float)qs[i] * k8_unit(k8_exp(ps[i]));
        } else if (pm != P_MASTER) {
            for (int i = 0; i < len; i++) P[i] = bf16_to_f(ps[i]);
        }
        for (int i = 0; i < len; i++) G[i] = bf16_to_f(gs[i]);
    }
    /* the state as fp32: fp32 slots in place, others decoded into tiles */
    float *sv[MAX_SLOTS] = {S[0], S[1], S[2]};
    for (int k = 0; k < ns; k++) {
        if (sf == S_FP32 || ((C->A->fp32_slots >> k) & 1)) {
            sv[k] = (float *)R->slot[k] + e;
        } else if (sf == S_BF16) {
            const uint16_t *s = (const uint16_t *)R->slot[k] + e;
            for (int i = 0; i < len; i++) S[k][i] = bf16_to_f(s[i]);
        } else {
            decode8((const uint8_t *)R->slot[k] + t, R->scale[k] + t / GROUP, ng, S[k], (C->A->signs >> k) & 1);
        }
    }
    float *restrict s0 = sv[0], *restrict s1 = sv[1], *restrict s2 = sv[2];
    if (counting) { /* the cautious mask's first pass: decoded and computed, nothing stored */
        int64_t kept = 0;
        for (int i = 0; i < len; i++)
            kept += element(alg, pv + i, gv[i], s0 + i, s1 + i, s2 + i, C->hp, ns, ams, skip, cau, cs, 1);
        return kept;
    }
    for (int i = 0; i < len; i++)
        element(alg, pv + i, gv[i], s0 + i, s1 + i, s2 + i, C->hp, ns, ams, skip, cau, cs, 0);
    /* encode the parameter */
    if (pm != P_NATIVE) {
        uint16_t *ps = (uint16_t *)param + e;
        if (pm == P_KAHAN) {
            uint16_t *cs = (uint16_t *)R->aux + e;
            uint32_t w = weyl(i0, seed[0]);
            for (int i = 0; i < len; i++, w += WEYL) {
                const uint16_t h = f_to_bf16_rne(P[i]);
                ps[i] = h;
                cs[i] = f_to_bf16_sr(P[i] - bf16_to_f(h), w);
            }
        } else if (pm == P_KAHAN8) {
            /* q = floor(r / u + z) with z the stream's 16 bits: every operation exact (formats.py) */
            int8_t *qs = (int8_t *)R->aux + e;
            uint32_t w = weyl(i0, seed[0]);
            for (int i = 0; i < len; i++, w += WEYL) {
                const uint16_t h = f_to_bf16_rne(P[i]);
                const int ex = k8_exp(h);
                ps[i] = h;
                const float t = (P[i] - bf16_to_f(h)) * k8_inv(ex);
                float q = floorf(t + (float)(w >> 16) * (1.0f / 65536.0f));
                q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
                qs[i] = (ex >= KAHAN8_MIN_EXP && ex < 255) ? (int8_t)(int32_t)q : (int8_t)0;
            }
        } else if (pm == P_SR) {
            uint32_t w = weyl(i0, seed[0]);
            for (int i = 0; i < len; i++, w += WEYL) ps[i] = f_to_bf16_sr(P[i], w);
        } else {
            for (int i = 0; i < len; i++) ps[i] = f_to_bf16_rne(pv[i]);
        }
    }
    /* encode the state */
    for (int k = 0; k < ns && sf == S_BF16; k++) {
        if ((C->A->fp32_slots >> k) & 1) continue; /* stepped in place */
        uint16_t *s = (uint16_t *)R->slot[k] + e;
        uint32_t w = weyl(i0, seed[k + 1]);
        for (int i = 0; i < len; i++, w += WEYL) s[i] = f_to_bf16_sr(S[k][i], w);
    }
    if (sf == S_8BIT) {
        /* signed slots first: where one's code is not zero, the unsigned codes are not either
         * (quant8.floor_pairs); a row's short last group is encoded as the reference pads it */
        /* the mask is only read by unsigned 8-bit slots (Lion keeps none) */
        const int coded = ~C->A->fp32_slots & ((1 << ns) - 1);
        const int unsigned_coded = coded & ~C->A->signs;
        uint8_t NZ[TILE];
        if (unsigned_coded) memset(NZ, 0, sizeof NZ);
        for (int pass = 1; pass >= 0; pass--) {
            for (int k = 0; k < ns; k++) {
                const int sgn = (C->A->signs >> k) & 1;
                if (((C->A->fp32_slots >> k) & 1) || sgn != pass) continue;
                for (int i = len; i < ng * GROUP; i++) S[k][i] = 0.0f;
                uint8_t *codes = (uint8_t *)R->slot[k] + t;
                encode8(S[k], codes, R->scale[k] + t / GROUP, ng, i0, seed[k + 1], sgn, NZ);
                if (sgn && unsigned_coded)
                    for (int i = 0; i < ng * GROUP; i++) NZ[i] |= (uint8_t)(codes[i] != 128);
            }
        }
    }
    return 0;
}

/* every other combination: tile by tile. [a, b) is a range of the row's work space (``space``),
 * in whole groups; a tile ends at TILE elements, its row's end or b. */
static AI int64_t piece_tiled(const ctx_t *C, const int alg, const row_t *R, void *param, const void *grad,
                              int64_t a, int64_t b, const int pm, const int sf, const int ns, const int ams,
                              const int skip, const int cau, const float cs, const int counting) {
    const args_t *A = C->A;
    uint32_t seed[MAX_SLOTS + 1];
    for (int k = 0; k <= ns; k++) seed[k] = mix_seed(A->step, R->uid, k);
    const int64_t L = R->len, Lp = (L + GROUP - 1) / GROUP * GROUP;
    int64_t kept = 0;
    for (int64_t t = a; t < b;) {
        const int64_t row = t / Lp, col = t - row * Lp, e = row * L + col; /* work space -> element */
        int64_t w = TILE; /* the tile's extent in the work space */
        if (w > Lp - col) w = Lp - col;
        if (w > b - t) w = b - t;
        const int64_t n = w < L - col ? w : L - col; /* its elements (a row's padding excluded) */
        if (n == TILE)
            kept += tile(C, alg, R, param, grad, t, e, TILE, seed, pm, sf, ns, ams, skip, cau, cs, counting);
        else
            kept += tile(C, alg, R, param, grad, t, e, (int)n, seed, pm, sf, ns, ams, skip, cau, cs, counting);
        t += w;
    }
    return kept;
}

/* The common cases get loops specialized at compile time (algorithm, parameter mode, state
 * format, slot count); amsgrad, skip_nonfinite and the cautious mask share one loop with run-time
 * flags per (algorithm, mode, format): a smaller library, built faster. */
static __attribute__((noinline, optimize("no-unswitch-loops"))) int64_t
piece_flags(const ctx_t *C, const int alg, const row_t *R, void *param, const void *grad, int64_t a, int64_t b,
            const int pm, const int sf, const float cs) {
    const args_t *A = C->A;
    if (pm == P_NATIVE && sf == S_FP32)
        return piece_fp32(C, alg, R, (float *)param, (const float *)grad, a, b, A->nslots, A->ams, A->skip,
                          A->cautious, cs, C->counting);
    return piece_tiled(C, alg, R, param, grad, a, b, pm, sf, A->nslots, A->ams, A->skip, A->cautious, cs,
                       C->counting);
}

#define FORMAT(ALG, NS, PM, SF)                                                                   \
    if (pm == PM && sf == SF) {                                                                   \
        if (PM == P_NATIVE && SF == S_FP32)                                                       \
            piece_fp32(C, ALG, R, (float *)param, (const float *)grad, a, b, NS, 0, 0, 0, 0.0f, 0); \
        else                                                                                      \
            piece_tiled(C, ALG, R, param, grad, a, b, PM, SF, NS, 0, 0, 0, 0.0f, 0);              \
        return;                                                                                   \
    }
#define ALL_FORMATS(ALG, NS)                                                                      \
    FORMAT(ALG, NS, P_NATIVE, S_FP32) FORMAT(ALG, NS, P_NATIVE, S_BF16)                          \
    FORMAT(ALG, NS, P_NATIVE, S_8BIT) FORMAT(ALG, NS, P_PLAIN, S_FP32)                           \
    FORMAT(ALG, NS, P_PLAIN, S_BF16) FORMAT(ALG, NS, P_PLAIN, S_8BIT)                            \
    FORMAT(ALG, NS, P_KAHAN, S_FP32) FORMAT(ALG, NS, P_KAHAN, S_BF16)                            \
    FORMAT(ALG, NS, P_KAHAN, S_8BIT) FORMAT(ALG, NS, P_KAHAN8, S_FP32)                           \
    FORMAT(ALG, NS, P_KAHAN8, S_BF16) FORMAT(ALG, NS, P_KAHAN8, S_8BIT)                          \
    FORMAT(ALG, NS, P_SR, S_FP32)                                                                 \
    FORMAT(ALG, NS, P_SR, S_BF16) FORMAT(ALG, NS, P_SR, S_8BIT)                                  \
    FORMAT(ALG, NS, P_MASTER, S_FP32) FORMAT(ALG, NS, P_MASTER, S_BF16)                          \
    FORMAT(ALG, NS, P_MASTER, S_8BIT)
/* the formats a user picks for speed; the rest share the generic loop (a smaller library) */
#define FAST_FORMATS(ALG, NS)                                                                     \
    FORMAT(ALG, NS, P_NATIVE, S_FP32) FORMAT(ALG, NS, P_NATIVE, S_BF16)                          \
    FORMAT(ALG, NS, P_NATIVE, S_8BIT) FORMAT(ALG, NS, P_KAHAN, S_BF16)                           \
    FORMAT(ALG, NS, P_KAHAN, S_8BIT) FORMAT(ALG, NS, P_KAHAN8, S_FP32)                           \
    FORMAT(ALG, NS, P_KAHAN8, S_BF16) FORMAT(ALG, NS, P_KAHAN8, S_8BIT)

/* [a, b) of selected row j (row r of the table) */
/* the cautious mask's two passes (counting, then the step) in loops of their own, for fp32
 * parameters and state: each further format would add ~3 s to the build (others take the loop
 * with run-time flags, correct and about 10x slower) */
#define CFORMAT(ALG, NS, PM, SF)                                                                  \
    if (pm == PM && sf == SF) {                                                                   \
        const float c = C->cs ? C->cs[j] : 0.0f;                                                  \
        if (PM == P_NATIVE && SF == S_FP32) {                                                     \
            float *fp = (float *)param;                                                           \
            const float *fg = (const float *)grad;                                                \
            kept = C->counting ? piece_fp32(C, ALG, R, fp, fg, a, b, NS, 0, 0, 1, c, 1)            \
                               : piece_fp32(C, ALG, R, fp, fg, a, b, NS, 0, 0, 1, c, 0);           \
        } else {                                                                                  \
            kept = C->counting ? piece_tiled(C, ALG, R, param, grad, a, b, PM, SF, NS, 0, 0, 1, c, 1) \
                               : piece_tiled(C, ALG, R, param, grad, a, b, PM, SF, NS, 0, 0, 1, c, 0); \
        }                                                                                         \
        break;                                                                                    \
    }
#define CAUTIOUS_FORMATS(ALG, NS)                                                                 \
    CFORMAT(ALG, NS, P_NATIVE, S_FP32)
#define NO_FORMATS(ALG, NS)

static void run_piece(const ctx_t *C, int64_t j, int64_t r, int64_t a, int64_t b) {
    const args_t *A = C->A;
    const row_t *R = A->rows + r;
    void *param = A->param[r];
    const void *grad = A->grad[r];
    const int pm = A->pmode, sf = A->sfmt;
    int64_t kept = 0;
    switch (A->alg) { /* the common case's own loops, else one loop with run-time flags */
#define ALG_RUN(ID, FN, PREP, MAXS, NS, SET, CSET)                                               \
    case ID:                                                                                      \
        if (!(A->ams || A->skip || A->cautious)) { SET(ID, NS) }                                  \
        if (A->cautious && !(A->ams || A->skip)) { CSET(ID, NS) }                                 \
        kept = piece_flags(C, ID, R, param, grad, a, b, pm, sf, C->cs ? C->cs[j] : 0.0f);         \
        break;
        ALGORITHMS(ALG_RUN)
    }
    if (C->counting) __atomic_fetch_add(&C->counts[j], kept, __ATOMIC_RELAXED);
}

/* ---- a share of the step: the work space is every selected tensor, each padded to whole groups,
 * end to end; a thread takes [lo, hi) of it (whole groups: 8-bit groups never straddle threads) */

static void run_share(const ctx_t *C, const int64_t *start, int64_t lo, int64_t hi) {
    const args_t *A = C->A;
    /* the first tensor that ends after lo */
    int64_t l = 0, h = A->nrows;
    while (l < h) {
        const int64_t mid = (l + h) / 2;
        if (start[mid + 1] <= lo) l = mid + 1; else h = mid;
    }
    for (int64_t j = l; j < A->nrows && start[j] < hi; j++) {
        const int64_t r = A->sel ? A->sel[j] : j;
        const int64_t n = space(A->rows + r);
        const int64_t a = lo > start[j] ? lo - start[j] : 0;
        const int64_t b = hi - start[j] < n ? hi - start[j] : n;
        if (a < b) run_piece(C, j, r, a, b);
    }
}

/* ---- threads ------------------------------------------------------------------------------ *
 *
 * Preferably torch's own OpenMP pool (GOMP_parallel, found by native.py in the process): its
 * threads are alive, placed, and spinning right after torch's last parallel operation (the
 * backward pass). Threads of our own would compete with those spinning threads for the cores:
 * measured on 2 cores, 32M fp32 parameters, right after a torch parallel op: 16-18 ms with fresh
 * pthreads, 9.8 ms on torch's pool (torch's fused step: 12.1 ms). Without an OpenMP runtime,
 * pthreads are started per call. */

/* Below this many elements per thread, handing work to another thread (waking a pool thread,
 * or starting one) costs more than it saves. */
#define MIN_PER_THREAD (1 << 15)
#define MAX_THREADS 256

typedef struct {
    const ctx_t *C;
    const int64_t *start;
    int64_t share, total;
    int nt;
    int next; /* the next share to take; shares are taken, not assigned, so a smaller team
               * than asked for still covers every share */
    unsigned csr;
} team_t;

static void team_worker(void *arg) {
    team_t *T = (team_t *)arg;
    const unsigned old = GET_FP_MODE();
    SET_FP_MODE(T->csr);
    for (;;) {
        const int k = __atomic_fetch_add(&T->next, 1, __ATOMIC_RELAXED);
        if (k >= T->nt) break;
        const int64_t lo = T->share * k, hi = lo + T->share < T->total ? lo + T->share : T->total;
        if (lo < hi) run_share(T->C, T->start, lo, hi);
    }
    SET_FP_MODE(old); /* the pool's threads run torch's own work afterwards */
}

static void *pthread_worker(void *arg) {
    team_worker(arg);
    return NULL;
}

typedef void (*omp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);

/* One pass over the work space [0, total) on a team of threads. */
static void run_team(const ctx_t *C, const int64_t *start, int64_t total) {
    const args_t *A = C->A;
    int nt = A->nthreads < 1 ? 1 : (A->nthreads > MAX_THREADS ? MAX_THREADS : A->nthreads);
    const int64_t most = (total + MIN_PER_THREAD - 1) / MIN_PER_THREAD;
    if (most < nt) nt = most < 1 ? 1 : (int)most;
    const int64_t share = ((total + nt - 1) / nt + TILE - 1) / TILE * TILE;
    team_t T = {C, start, share, total, nt, 0, GET_FP_MODE()};
    if (nt > 1 && A->omp_parallel) {
        ((omp_parallel_fn)A->omp_parallel)(team_worker, &T, (unsigned)nt, 0);
    } else {
        pthread_t tids[MAX_THREADS];
        int running = 0;
        for (int k = 1; k < nt; k++) running += pthread_create(&tids[running], NULL, pthread_worker, &T) == 0;
        team_worker(&T); /* this thread takes shares too: every share is done even if none started */
        for (int k = 0; k < running; k++) pthread_join(tids[k], NULL);
    }
}

/* out[0..4] = ABI_VERSION, sizeof(row_t), sizeof(args_t), N_HP, MAX_SLOTS */
void adamkit_abi(int64_t *out) {
    out[0] = ABI_VERSION;
    out[1] = (int64_t)sizeof(row_t);
    out[2] = (int64_t)sizeof(args_t);
    out[3] = N_HP;
    out[4] = MAX_SLOTS;
}

/* The id of the algorithm whose body is named ``name`` in ALGORITHMS (an Algorithm declaration's
 * ``native``), or -1: Python never hard-codes the ids. */
int32_t adamkit_algorithm(const char *name) {
#define ALG_NAME(ID, FN, ...) if (!strcmp(name, #FN)) return ID;
    ALGORITHMS(ALG_NAME)
    return -1;
}

/* Returns 0; -1 where memory for the table of starts could not be had; -2 for an algorithm,
 * parameter mode, state format or slot count this kernel does not have (nothing was changed). */
int adamkit_step(const args_t *A) {
    if (A->alg < 0 || A->alg >= N_ALGS) return -2;
    if (A->pmode < P_NATIVE || A->pmode > P_KAHAN8 || A->sfmt < S_FP32 || A->sfmt > S_8BIT) return -2;
    if (A->nslots < 1 || A->nslots > MAX_SLOTS || A->nslots > max_slots_of[A->alg]) return -2;
    if (A->nrows <= 0) return 0;
    int64_t local[65];
    int64_t *start = A->nrows < 64 ? local : (int64_t *)malloc((size_t)(A->nrows + 1) * sizeof(int64_t));
    if (!start) return -1;
    start[0] = 0;
    for (int64_t j = 0; j < A->nrows; j++) {
        const int64_t n = space(A->rows + (A->sel ? A->sel[j] : j));
        start[j + 1] = start[j] + (n + GROUP - 1) / GROUP * GROUP;
    }
    const int64_t total = start[A->nrows];
    ctx_t C;
    make_ctx(A, &C);
    C.cs = NULL, C.counts = NULL, C.counting = 0;
    float *cs = NULL;
    if (A->cautious) {
        /* the mask's factor per tensor needs the tensor's count before any element is stored:
         * a counting pass (it reads what the step reads, writes nothing), then the step */
        cs = (float *)malloc((size_t)A->nrows * sizeof(float));
        C.counts = (int64_t *)calloc((size_t)A->nrows, sizeof(int64_t));
        if (!cs || !C.counts) {
            free(cs);
            free(C.counts);
            if (start != local) free(start);
            return -1;
        }
        C.counting = 1;
        run_team(&C, start, total);
        for (int64_t j = 0; j < A->nrows; j++) {
            const row_t *R = A->rows + (A->sel ? A->sel[j] : j);
            cs[j] = (float)((double)R->n / (double)(C.counts[j] + 1));
        }
        C.counting = 0;
        C.cs = cs;
    }
    run_team(&C, start, total);
    if (cs) {
        free(C.counts);
        free(cs);
    }
    if (start != local) free(start);
    return 0;
}

/* ---- aliasing ----------------------------------------------------------------------------- *
 * The per-tensor backends read every gradient before writing any parameter of the same tensor,
 * and tensor by tensor. A gradient that overlaps memory the step writes in another tensor, or at
 * another offset of its own (p.grad = another parameter, or a view of one), would be read after a
 * thread has written it. ``spans`` holds the table's parameters as (lo, hi, reach) triples sorted
 * by lo, reach being the furthest hi so far (built once per table: parameters do not move while
 * it lives). Returns the first selected row whose gradient overlaps a parameter it is not exactly,
 * else -1; the caller copies such gradients first. O(log n) per gradient, no allocation. */

int64_t adamkit_grad_overlap(const args_t *A, int32_t psize, const uint64_t *spans, int64_t nspans) {
    for (int64_t j = 0; j < A->nrows; j++) {
        const int64_t r = A->sel ? A->sel[j] : j;
        const uint64_t glo = (uint64_t)(uintptr_t)A->grad[r], ghi = glo + (uint64_t)(A->rows[r].n * psize);
        if (glo == ghi) continue;
        int64_t l = 0, h = nspans; /* l: how many spans start below ghi */
        while (l < h) {
            const int64_t mid = (l + h) / 2;
            if (spans[3 * mid] < ghi) l = mid + 1; else h = mid;
        }
        for (int64_t k = l - 1; k >= 0 && spans[3 * k + 2] > glo; k--) {
            if (spans[3 * k + 1] <= glo) continue;
            if (spans[3 * k] == glo && glo == (uint64_t)(uintptr_t)A->param[r]) continue; /* its own */
            return r;
        }
    }
    return -1;
}

/* ---- correctly rounded elementwise operations (adamkit.ieee) for the foreach backend --------
 * The reference computes them in fp64 with torch (host-independent but ~15 passes); here each is
 * one IEEE instruction per element, as the kernel's bodies round them. op: 0 sqrt(a), 1 a / b,
 * 2 a / s, 3 s / a, 4 fma(a, s, c), 5 fma(a, b, c). One thread: the foreach backend calls it per
 * cache-sized chunk. Returns -2 for an unknown op. */
int adamkit_ieee(int32_t op, int64_t n, const float *restrict a, const float *restrict b,
                 const float *restrict c, float s, float *restrict out) {
    switch (op) {
    case 0: for (int64_t i = 0; i < n; i++) out[i] = sqrtf(a[i]); return 0;
    case 1: for (int64_t i = 0; i < n; i++) out[i] = a[i] / b[i]; return 0;
    case 2: for (int64_t i = 0; i < n; i++) out[i] = a[i] / s; return 0;
    case 3: for (int64_t i = 0; i < n; i++) out[i] = s / a[i]; return 0;
    case 4: for (int64_t i = 0; i < n; i++) out[i] = fmaf(a[i], s, c[i]); return 0;
    case 5: for (int64_t i = 0; i < n; i++) out[i] = fmaf(a[i], b[i], c[i]); return 0;
    default: return -2;
    }
}
