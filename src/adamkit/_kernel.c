/* The fused backend's native kernel: one pass over a bucket's flat buffers per step.
 *
 * It composes the same three layers as the Python backends, element by element:
 *   decode (storage -> fp32)  ->  the Adam update of _math.adam_update  ->  encode (fp32 -> storage)
 * with the same operations in the same order (compiled with -ffp-contract=off, so no multiply-add
 * is fused where the reference rounds twice). fp32 results equal the reference backend's except
 * where torch's vectorized square root (not always correctly rounded) differs from sqrtf in the
 * last bit. The reference backend stays the spec; tests hold this kernel to it.
 *
 * Why C and not only torch.compile: (1) 8-bit blocks. Each block of 256 is decoded, updated and
 * re-encoded while it sits in L1 (the new block scale needs the whole block first), so memory is
 * read and written once; inductor makes two passes over memory for the same graph. (2) bf16
 * values are moved as 16-bit integers with shifts, not as half-width float vectors. (3) Start-up:
 * a few hundred lines of C build in about two seconds, once per machine, and load from the on-disk
 * cache in milliseconds, where torch.compile needs seconds in every process.
 *
 * Buffers per element (bytes): param 4 (fp32) or 2 (bf16); grad the same; kahan_comp 2 (bf16);
 * master_weight 4; each moment 4 (fp32), 2 (bf16) or 1 + 4/256 (8-bit codes + block scales).
 */
#include <math.h>
#include <float.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GET_FP_MODE() _mm_getcsr()
#define SET_FP_MODE(m) _mm_setcsr(m)
#else /* elsewhere threads start with the default floating-point mode */
#define GET_FP_MODE() 0u
#define SET_FP_MODE(m) ((void)(m))
#endif

enum { P_NATIVE = 0, P_PLAIN = 1, P_KAHAN = 2, P_SR = 3, P_MASTER = 4 };
enum { S_FP32 = 0, S_BF16 = 1, S_8BIT = 2 };
enum { L2 = 0, DECAY, OMB1, BETA2, OMB2, EPS, STEP_SIZE, BC2_SQRT, GRAD_SIGN, N_HP };
/* the kernel's own scalars after the caller's: 1/BC2_SQRT rounded to nearest */
enum { INV_BC2_SQRT = N_HP, N_HP_ALL };

#define BLOCK 256

typedef struct {
    int64_t n;          /* elements in every flat buffer, a multiple of BLOCK */
    void *param;        /* fp32 or bf16 */
    void *grad;         /* same dtype as param */
    void *aux;          /* kahan_comp (bf16) or master_weight (fp32), else NULL */
    void *mom[3];       /* exp_avg, exp_avg_sq, max_exp_avg_sq: fp32, bf16 or uint8 codes */
    float *scale[3];    /* 8-bit block scales, else NULL */
    float hp[N_HP];     /* Scalars, in _math.Scalars.FIELDS order */
    uint32_t seed[4];   /* rounding streams: parameter, then each moment */
    int32_t pmode, sfmt, amsgrad, skip, nthreads;
    /* gradients read where the caller keeps them, not from ``grad``. Segment k covers elements
     * [seg_lo[k], seg_lo[k + 1]) (seg_lo[nseg] == n) and seg_grad[k] points at the gradient of
     * element seg_lo[k]. nseg == 0: every gradient is in ``grad``. */
    int64_t nseg;
    const int64_t *seg_lo;
    const void *const *seg_grad;
    void *omp_parallel; /* GOMP_parallel of torch's OpenMP runtime, or NULL */
} args_t;

/* ---- storage: bf16 and rounding ------------------------------------------------------------ */

static inline uint32_t f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static inline float bf16_to_f(uint16_t h) { return u2f((uint32_t)h << 16); }

/* Rounding bits: the top 16 bits of a Weyl sequence, h(index) = index * WEYL + seed (mod 2^32),
 * as _storage.hash_bits. Loops start from h(first index) and add WEYL per element: vectorized, an
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

/* stochastic rounding (_storage.round_bf16_stochastic) with h = weyl(index, seed) */
static inline uint16_t f_to_bf16_sr(float x, uint32_t h) { return (uint16_t)((f2u(x) + (h >> 16)) >> 16); }

/* ---- the math: _math.adam_update with wd_mode="runtime", maximize via grad_sign -------------- */

/* x / BC2_SQRT, correctly rounded, without a division: q = x * (1/b) is within an ulp of x/b, and
 * one correction q + (x - q*b) * (1/b), with the remainder exact in an FMA, rounds to exactly
 * RN(x/b) when 1/b is itself rounded to nearest (Markstein's theorem; no underflow can occur here,
 * as x = sqrt(v) and b in (0, 1]). The divider is the step's bottleneck where compute bounds it
 * (bf16 and 8-bit formats); this takes one of its three operations per element off it. Checked
 * against the division on 1e9 pairs, exhaustively over [1, 2) for 88 values of b. Non-finite x
 * keeps the plain product (inf stays inf, nan stays nan), as the division would. */
static inline __attribute__((always_inline)) float div_bc2(float x, const float *hp) {
#ifdef FP_FAST_FMAF
    const float q = x * hp[INV_BC2_SQRT];
    const float c = fmaf(fmaf(-q, hp[BC2_SQRT], x), hp[INV_BC2_SQRT], q);
    return fabsf(q) <= FLT_MAX ? c : q;
#else /* no fused multiply-add in hardware: fmaf would be a slow library call */
    return x / hp[BC2_SQRT];
#endif
}

static inline __attribute__((always_inline)) void
adam(float *pp, float g, float *mp, float *vp, float *xp, const float *hp, const int ams, const int skip) {
    const float p = *pp, m = *mp, v = *vp;
    const int ok = fabsf(g) <= FLT_MAX;
    if (skip) g = ok ? g : 0.0f;
    g = g * hp[GRAD_SIGN];
    g = g + p * hp[L2];
    float np = p * hp[DECAY];
    /* torch's vectorized lerp: one fused multiply-add from whichever end is nearer */
    const float w = hp[OMB1];
    const int small = fabsf(w) < 0.5f;
    float nm = fmaf(small ? w : w - 1.0f, g - m, small ? m : g);
    float nv = v * hp[BETA2] + (g * g) * hp[OMB2];
    float vv = nv, nx = 0.0f;
    if (ams) {
        const float x = *xp;
        nx = (x > nv || x != x) ? x : nv; /* torch.maximum: nan wins */
        vv = nx;
    }
    const float denom = div_bc2(sqrtf(vv), hp) + hp[EPS];
    np = np - (nm / denom) * hp[STEP_SIZE];
    if (skip) {
        np = ok ? np : p;
        nm = ok ? nm : m;
        nv = ok ? nv : v;
        if (ams) nx = ok ? nx : *xp;
    }
    *pp = np;
    *mp = nm;
    *vp = nv;
    if (ams) *xp = nx;
}

/* ---- 8-bit blocks: _quant.decode_blocks / encode_blocks ------------------------------------- */

#define QM 127
#define QV 254

static inline __attribute__((always_inline)) void
decode8(const uint8_t *restrict c, float a, float *restrict x, const int sgn) {
    if (sgn) {
        const float k = a * (float)(1.0 / (QM * QM));
        for (int i = 0; i < BLOCK; i++) {
            const float q = (float)c[i] - 128.0f;
            const float y = (q * fabsf(q)) * k;
            x[i] = c[i] == 0 ? NAN : y;
        }
    } else {
        const float k = a * (float)(1.0 / ((double)QV * QV * QV * QV));
        for (int i = 0; i < BLOCK; i++) {
            const float q = (float)c[i];
            const float q2 = q * q;
            const float y = (q2 * q2) * k;
            x[i] = c[i] == 255 ? NAN : y;
        }
    }
}

static inline __attribute__((always_inline)) void
encode8(const float *restrict x, uint8_t *restrict c, float *scale, uint32_t index0, uint32_t seed,
        const int sgn) {
    /* the largest finite magnitude; non-negative floats order like their bit patterns, and an
     * integer max reduction vectorizes where a float one (not associative with nan) would not */
    uint32_t amax = 0;
#pragma omp simd reduction(max : amax)
    for (int i = 0; i < BLOCK; i++) {
        const uint32_t m = fabsf(x[i]) <= FLT_MAX ? f2u(fabsf(x[i])) : 0u;
        amax = amax > m ? amax : m;
    }
    const float a = u2f(amax);
    *scale = a;
    const float inv = a > 0.0f ? 1.0f / a : 0.0f;
    uint32_t h = weyl(index0, seed);
    if (sgn) {
        const float k = (float)(1.0 / (QM * QM));
        for (int i = 0; i < BLOCK; i++) {
            const int fin = fabsf(x[i]) <= FLT_MAX;
            const float r = (fin ? fabsf(x[i]) : 0.0f) * inv;
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
        for (int i = 0; i < BLOCK; i++) {
            const int fin = fabsf(x[i]) <= FLT_MAX;
            const float r = (fin ? fabsf(x[i]) : 0.0f) * inv;
            float q = floorf(sqrtf(sqrtf(r)) * (float)QV);
            q = q < (float)(QV - 1) ? q : (float)(QV - 1);
            const float q2 = q * q, d2 = (q + 1.0f) * (q + 1.0f);
            const float lo = q2 * q2 * k, hi = d2 * d2 * k;
            const float u = (float)(h >> 16) * (1.0f / 65536.0f);
            h += WEYL;
            q = q + (u * (hi - lo) < r - lo ? 1.0f : 0.0f);
            c[i] = fin ? (uint8_t)(int32_t)q : (uint8_t)255;
        }
    }
}

/* ---- one range of a bucket ---------------------------------------------------------------- */

/* the caller's scalars and the kernel's own, in a local copy (no store in the loop can alias it) */
static inline void scalars(const args_t *A, float *hp) {
    memcpy(hp, A->hp, sizeof A->hp);
    hp[INV_BC2_SQRT] = 1.0f / hp[BC2_SQRT];
}

/* fp32 parameters and moments: straight from memory to memory (28 B per element, 32 amsgrad) */
static inline __attribute__((always_inline)) void
range_fp32(const args_t *A, int64_t lo, int64_t hi, const float *restrict g, const int ams, const int skip) {
    float *restrict p = (float *)A->param + lo;
    float *restrict m = (float *)A->mom[0] + lo;
    float *restrict v = (float *)A->mom[1] + lo;
    float *restrict x = ams ? (float *)A->mom[2] + lo : (float *)0;
    float hp[N_HP_ALL];
    scalars(A, hp);
    const int64_t n = hi - lo;
    for (int64_t i = 0; i < n; i++) adam(p + i, g[i], m + i, v + i, ams ? x + i : (float *)0, hp, ams, skip);
}

/* The gradient segment (args_t) holding element t, searching on from segment k: segments are in
 * element order, so a caller walking its range forwards keeps k as a cursor. */
static inline int64_t seg_of(const args_t *A, int64_t t, int64_t k) {
    while (A->seg_lo[k + 1] <= t) k++;
    return k;
}

/* The gradients of elements [t, t + BLOCK) (``size`` bytes each): where they lie if one segment
 * holds them all, else gathered into ``buf``. ``seg`` is the caller's cursor into the segments. */
static inline const void *grad_block(const args_t *A, int64_t t, int64_t *seg, void *buf, int size) {
    if (A->nseg == 0) return (const char *)A->grad + t * size;
    int64_t k = *seg = seg_of(A, t, *seg);
    if (A->seg_lo[k + 1] >= t + BLOCK) return (const char *)A->seg_grad[k] + (t - A->seg_lo[k]) * size;
    for (int64_t i = t; i < t + BLOCK; k++) {
        const int64_t end = A->seg_lo[k + 1] < t + BLOCK ? A->seg_lo[k + 1] : t + BLOCK;
        memcpy((char *)buf + (i - t) * size, (const char *)A->seg_grad[k] + (i - A->seg_lo[k]) * size,
               (size_t)((end - i) * size));
        i = end;
    }
    return buf;
}

/* every other combination: one block of 256 at a time, decoded into L1, updated, encoded back */
static inline __attribute__((always_inline)) void
range_tiled(const args_t *A, int64_t lo, int64_t hi, const int pm, const int sf, const int ams,
            const int skip) {
    float P[BLOCK], G[BLOCK], M[BLOCK], V[BLOCK], X[BLOCK], GB[BLOCK];
    float hp[N_HP_ALL];
    scalars(A, hp);
    const int nmom = ams ? 3 : 2;
    int64_t seg = 0;
    for (int64_t t = lo; t < hi; t += BLOCK) {
        /* the moments as fp32: in L1 tiles, or (fp32 state) where they lie, updated in place;
         * copying fp32 moments through tiles cost 20-28 % of the step's time in these modes */
        float *mom[3] = {M, V, X};
        const int len = BLOCK; /* buffers of these formats are whole blocks long (_fused.py) */
        const uint32_t i0 = (uint32_t)t;
        /* decode the parameter and gradient; fp32 parameters (and master weights) are updated
         * where they lie */
        float *restrict pv = pm == P_NATIVE ? (float *)A->param + t : (pm == P_MASTER ? (float *)A->aux + t : P);
        const void *graw = grad_block(A, t, &seg, GB, pm == P_NATIVE ? 4 : 2);
        const float *restrict gv = pm == P_NATIVE ? (const float *)graw : G;
        if (pm != P_NATIVE) {
            const uint16_t *ps = (const uint16_t *)A->param + t, *gs = (const uint16_t *)graw;
            if (pm == P_MASTER) {
                /* pv points at the master weights */
            } else if (pm == P_KAHAN) {
                const uint16_t *cs = (const uint16_t *)A->aux + t;
                for (int i = 0; i < len; i++) P[i] = bf16_to_f(ps[i]) + bf16_to_f(cs[i]);
            } else {
                for (int i = 0; i < len; i++) P[i] = bf16_to_f(ps[i]);
            }
            for (int i = 0; i < len; i++) G[i] = bf16_to_f(gs[i]);
        }
        /* decode the moments */
        for (int k = 0; k < nmom; k++) {
            if (sf == S_FP32) {
                mom[k] = (float *)A->mom[k] + t;
            } else if (sf == S_BF16) {
                const uint16_t *s = (const uint16_t *)A->mom[k] + t;
                for (int i = 0; i < len; i++) mom[k][i] = bf16_to_f(s[i]);
            } else {
                decode8((const uint8_t *)A->mom[k] + t, A->scale[k][t / BLOCK], mom[k], k == 0);
            }
        }
        /* the update */
        float *restrict mv = mom[0], *restrict vv = mom[1], *restrict xv = mom[2];
        for (int i = 0; i < len; i++) adam(pv + i, gv[i], mv + i, vv + i, xv + i, hp, ams, skip);
        /* encode the parameter */
        if (pm != P_NATIVE) {
            uint16_t *ps = (uint16_t *)A->param + t;
            if (pm == P_KAHAN) {
                uint16_t *cs = (uint16_t *)A->aux + t;
                uint32_t w = weyl(i0, A->seed[0]);
                for (int i = 0; i < len; i++, w += WEYL) {
                    const uint16_t h = f_to_bf16_rne(P[i]);
                    ps[i] = h;
                    cs[i] = f_to_bf16_sr(P[i] - bf16_to_f(h), w);
                }
            } else if (pm == P_SR) {
                uint32_t w = weyl(i0, A->seed[0]);
                for (int i = 0; i < len; i++, w += WEYL) ps[i] = f_to_bf16_sr(P[i], w);
            } else {
                for (int i = 0; i < len; i++) ps[i] = f_to_bf16_rne(pv[i]);
            }
        }
        /* encode the moments */
        for (int k = 0; k < nmom && sf != S_FP32; k++) {
            if (sf == S_BF16) {
                uint16_t *s = (uint16_t *)A->mom[k] + t;
                uint32_t w = weyl(i0, A->seed[k + 1]);
                for (int i = 0; i < len; i++, w += WEYL) s[i] = f_to_bf16_sr(mom[k][i], w);
            } else {
                encode8(mom[k], (uint8_t *)A->mom[k] + t, &A->scale[k][t / BLOCK], i0, A->seed[k + 1], k == 0);
            }
        }
    }
}

/* The common case (no amsgrad, no skip_nonfinite) gets a loop specialized for each (parameter mode,
 * state format); the rare ones share one with run-time flags (a smaller library, built faster). */
#define VARIANTS(PM, SF)                                                                       \
    if (A->pmode == PM && A->sfmt == SF) {                                                    \
        if (A->amsgrad || A->skip) range_tiled_flags(A, lo, hi, PM, SF);                      \
        else range_tiled(A, lo, hi, PM, SF, 0, 0);                                            \
        return;                                                                               \
    }

static __attribute__((noinline, optimize("no-unswitch-loops"))) void
range_tiled_flags(const args_t *A, int64_t lo, int64_t hi, const int pm, const int sf) {
    range_tiled(A, lo, hi, pm, sf, A->amsgrad, A->skip);
}

static void run_fp32(const args_t *A, int64_t lo, int64_t hi, const float *g) {
    if (A->amsgrad) {
        if (A->skip) range_fp32(A, lo, hi, g, 1, 1); else range_fp32(A, lo, hi, g, 1, 0);
    } else {
        if (A->skip) range_fp32(A, lo, hi, g, 0, 1); else range_fp32(A, lo, hi, g, 0, 0);
    }
}

static void run_range(const args_t *A, int64_t lo, int64_t hi) {
    if (A->pmode == P_NATIVE && A->sfmt == S_FP32) {
        if (A->nseg == 0) {
            run_fp32(A, lo, hi, (const float *)A->grad + lo);
            return;
        }
        for (int64_t k = seg_of(A, lo, 0); lo < hi; k++) {
            const int64_t end = A->seg_lo[k + 1] < hi ? A->seg_lo[k + 1] : hi;
            run_fp32(A, lo, end, (const float *)A->seg_grad[k] + (lo - A->seg_lo[k]));
            lo = end;
        }
        return;
    }
    VARIANTS(P_NATIVE, S_BF16)
    VARIANTS(P_NATIVE, S_8BIT)
    VARIANTS(P_PLAIN, S_FP32)
    VARIANTS(P_PLAIN, S_BF16)
    VARIANTS(P_PLAIN, S_8BIT)
    VARIANTS(P_KAHAN, S_FP32)
    VARIANTS(P_KAHAN, S_BF16)
    VARIANTS(P_KAHAN, S_8BIT)
    VARIANTS(P_SR, S_FP32)
    VARIANTS(P_SR, S_BF16)
    VARIANTS(P_SR, S_8BIT)
    VARIANTS(P_MASTER, S_FP32)
    VARIANTS(P_MASTER, S_BF16)
    VARIANTS(P_MASTER, S_8BIT)
}

/* ---- threads ------------------------------------------------------------------------------ *
 *
 * Preferably torch's own OpenMP pool (GOMP_parallel, found by _native.py in the process): its
 * threads are alive, placed, and spinning right after torch's last parallel operation (the
 * backward pass). Threads of our own would compete with those spinning threads for the cores:
 * measured on 2 cores, 32M fp32 parameters, right after a torch parallel op: 16-18 ms with fresh
 * pthreads, 9.8 ms on torch's pool (torch's fused step: 12.1 ms). Without an OpenMP runtime,
 * pthreads are started per call. */

typedef struct {
    const args_t *A;
    int64_t lo, hi;
    unsigned csr;
} job_t;

static void *worker(void *arg) {
    const job_t *j = (const job_t *)arg;
    SET_FP_MODE(j->csr); /* the caller's denormal flushing (inherited on Linux; not everywhere) */
    run_range(j->A, j->lo, j->hi);
    return NULL;
}

/* Below this many elements per thread, handing work to another thread (waking a pool thread,
 * or starting one) costs more than it saves. */
#define MIN_PER_THREAD (1 << 15)
#define MAX_THREADS 256

typedef void (*omp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef struct {
    const args_t *A;
    int64_t share;
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
        const int64_t lo = T->share * k, hi = lo + T->share < T->A->n ? lo + T->share : T->A->n;
        if (lo < hi) run_range(T->A, lo, hi);
    }
    SET_FP_MODE(old); /* the pool's threads run torch's own work afterwards */
}

void adamkit_step(const args_t *A) {
    int nt = A->nthreads < 1 ? 1 : (A->nthreads > MAX_THREADS ? MAX_THREADS : A->nthreads);
    const int64_t most = (A->n + MIN_PER_THREAD - 1) / MIN_PER_THREAD;
    if (most < nt) nt = most < 1 ? 1 : (int)most;
    /* equal shares, whole blocks each (8-bit blocks never straddle two threads) */
    const int64_t share = ((A->n + nt - 1) / nt + BLOCK - 1) / BLOCK * BLOCK;
    const unsigned csr = GET_FP_MODE();
    if (nt > 1 && A->omp_parallel) {
        team_t T = {A, share, nt, 0, csr};
        ((omp_parallel_fn)A->omp_parallel)(team_worker, &T, (unsigned)nt, 0);
        return;
    }
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    int running[MAX_THREADS] = {0};
    for (int k = 1; k < nt; k++) {
        const int64_t lo = share * k, hi = lo + share < A->n ? lo + share : A->n;
        if (lo >= hi) break;
        jobs[k] = (job_t){A, lo, hi, csr};
        running[k] = pthread_create(&tids[k], NULL, worker, &jobs[k]) == 0;
        if (!running[k]) run_range(A, lo, hi); /* no thread to be had: do it here */
    }
    run_range(A, 0, share < A->n ? share : A->n);
    for (int k = 1; k < nt; k++)
        if (running[k]) pthread_join(tids[k], NULL);
}
