/* quantbench's native CPU kernels: one pass forward, one pass backward, float32, for the activation-sized work of
 * lsq / fixed, pact and qil (unsigned, no gamma), DoReFa weights, and, on AVX-512, QIL's signed / gamma weights.
 * Loaded by quantizers/native.py through ctypes.
 *
 * Each kernel does exactly the float32 operations of its Python body in quantizers/kernels/, in the same order
 * (built with -ffp-contract=off, so no fused multiply-add changes a rounding), so outputs equal the reference path
 * bit for bit. rintf rounds half to even, as torch.round. Parameter gradients are summed in double, per thread in a
 * fixed order, so they are reproducible for a given thread count.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_THREADS 256
#define PARALLEL_MIN 32768 /* below this one thread is faster than waking the others */

/* Keep NaN (both comparisons false), as torch.clamp does. */
static inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

static int team(int64_t n, int threads) {
    if (threads < 1 || n < PARALLEL_MIN) return 1;
    return threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* [begin, end) of thread t's static chunk */
static void chunk(int64_t n, int t, int nt, int64_t *begin, int64_t *end) {
    int64_t size = (n + nt - 1) / nt;
    *begin = size * t < n ? size * t : n;
    *end = *begin + size < n ? *begin + size : n;
}

/* 8-lane vectors (GCC / clang vector extensions: any target; AVX2 / AVX-512 where built with them). Used where a
 * loop has two double reductions, which `omp simd` does not keep in registers. Lanes are summed in a fixed order. */
typedef float floats8 __attribute__((vector_size(32)));
typedef int32_t ints8 __attribute__((vector_size(32)));
typedef double doubles8 __attribute__((vector_size(64)));

static inline floats8 load8(const float *p) { floats8 x; memcpy(&x, p, sizeof x); return x; }
static inline void store8(float *p, floats8 x) { memcpy(p, &x, sizeof x); }
/* mask ? x : +0.0 (mask lanes are all ones or all zeros) */
static inline floats8 select8(ints8 mask, floats8 x) { return (floats8)((ints8)x & mask); }
static inline double lane_sum(doubles8 lanes) {
    double sum = 0.0;
    for (int j = 0; j < 8; j++) sum += lanes[j];
    return sum;
}

/* The threads' partial sums in thread order (entries of threads OpenMP did not start stay 0): partial[t * stride] */
static double sum_partials(const double *partial, int nt, int stride) {
    double total = 0.0;
    for (int t = 0; t < nt; t++) total += partial[t * stride];
    return total;
}

#ifdef _OPENMP
#define THREAD_ID omp_get_thread_num()
#define TEAM_SIZE omp_get_num_threads()
#else
#define THREAD_ID 0
#define TEAM_SIZE 1
#endif

/* ---- LSQ (and the fixed-step baselines): clamp(round(v / step), lo, hi) * step ---------------------------------- */

void lsq_forward(const float *restrict v, float *restrict out, int64_t n, float step, float lo, float hi,
                 int threads) {
    int nt = team(n, threads);
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = clampf(rintf(v[i] / step), lo, hi) * step;
}

/* grad_v = grad inside the strict interior of v / step; returns sum(grad * d v_hat / d step) (eq. 3) when want_step */
double lsq_backward(const float *restrict grad, const float *restrict v, float *restrict grad_v, int64_t n, float step,
                    float lo, float hi, int want_step, int threads) {
    double partial[MAX_THREADS] = {0};
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = THREAD_ID;
        int64_t begin, end;
        chunk(n, t, TEAM_SIZE, &begin, &end);
        double sum = 0.0;
        if (want_step) {
#pragma omp simd reduction(+ : sum)
            for (int64_t i = begin; i < end; i++) {
                float z = v[i] / step;
                int inside = (z > lo) & (z < hi);
                grad_v[i] = inside ? grad[i] : 0.0f;
                sum += (double)(grad[i] * (clampf(rintf(z), lo, hi) - (inside ? z : 0.0f)));
            }
        } else {
#pragma omp simd
            for (int64_t i = begin; i < end; i++) {
                float z = v[i] / step;
                grad_v[i] = ((z > lo) & (z < hi)) ? grad[i] : 0.0f;
            }
        }
        partial[t] = sum;
    }
    return sum_partials(partial, nt, 1);
}

/* ---- PACT: clip to [0, alpha] ([-alpha, alpha] signed), round(clipped / step) * step ----------------------------- */

void pact_forward(const float *restrict v, float *restrict out, int64_t n, float alpha, float step, int is_signed,
                  int threads) {
    int nt = team(n, threads);
    if (is_signed) {
#pragma omp parallel for simd num_threads(nt) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            float inner = v[i] <= -alpha ? -alpha : v[i];
            out[i] = rintf((v[i] >= alpha ? alpha : inner) / step) * step;
        }
    } else {
#pragma omp parallel for simd num_threads(nt) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            float inner = v[i] >= 0.0f ? v[i] : 0.0f;
            out[i] = rintf((v[i] >= alpha ? alpha : inner) / step) * step;
        }
    }
}

/* returns d L / d alpha: grad where v >= alpha, -grad where v <= -alpha (signed). Vector types: see qil_backward. */
double pact_backward(const float *restrict grad, const float *restrict v, float *restrict grad_v, int64_t n,
                     float alpha, int is_signed, int threads) {
    double partial[MAX_THREADS] = {0};
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = THREAD_ID;
        int64_t begin, end;
        chunk(n, t, TEAM_SIZE, &begin, &end);
        doubles8 lanes = {0};
        int64_t i = begin;
        for (; i + 8 <= end; i += 8) {
            floats8 x = load8(v + i), upstream = load8(grad + i);
            ints8 upper = x >= alpha;
            /* signed: pass strictly inside (-alpha, alpha); unsigned: in [0, alpha) */
            ints8 lower = is_signed ? (x <= -alpha) & ~upper : upper & 0;
            ints8 pass = is_signed ? ~(upper | lower) : (x >= 0.0f) & ~upper;
            store8(grad_v + i, select8(pass, upstream));
            lanes += __builtin_convertvector((floats8)((ints8)select8(upper, upstream) | (ints8)select8(lower, -upstream)),
                                             doubles8);
        }
        double sum = lane_sum(lanes);
        for (; i < end; i++) { /* the last < 8 elements, same operations */
            int upper = v[i] >= alpha, lower = is_signed && v[i] <= -alpha;
            int pass = is_signed ? !(upper | lower) : (v[i] >= 0.0f) & !upper;
            grad_v[i] = pass ? grad[i] : 0.0f;
            sum += (double)(upper ? grad[i] : (lower ? -grad[i] : 0.0f));
        }
        partial[t] = sum;
    }
    return sum_partials(partial, nt, 1);
}

/* ---- DoReFa weights (PACT's weight scheme), given t = tanh(w) from torch ------------------------------------------
 * tanh itself stays a torch op: torch's CPU tanh is not SLEEF's, and no other tanh equals it bit for bit. */

/* max |t|, NaN if any t is NaN (as torch.max) */
static float peak_magnitude(const float *restrict t, int64_t n, int threads) {
    float partial[MAX_THREADS] = {0};
    int nan_seen[MAX_THREADS] = {0};
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int id = THREAD_ID;
        int64_t begin, end;
        chunk(n, id, TEAM_SIZE, &begin, &end);
        float peak = 0.0f;
        int nan = 0;
#pragma omp simd reduction(max : peak) reduction(| : nan)
        for (int64_t i = begin; i < end; i++) {
            float magnitude = fabsf(t[i]);
            peak = magnitude > peak ? magnitude : peak;
            nan |= magnitude != magnitude;
        }
        partial[id] = peak;
        nan_seen[id] = nan;
    }
    float peak = 0.0f;
    for (int k = 0; k < nt; k++) {
        if (nan_seen[k]) return NAN;
        peak = partial[k] > peak ? partial[k] : peak;
    }
    return peak;
}

/* (2 round(clamp(t / (2 max(peak, 1e-12)) + 1/2, 0, 1) n) / n - 1) scale: the eager _dorefa_forward_kernel */
void dorefa_forward(const float *restrict t, float *restrict out, int64_t n, float levels, float scale, int threads) {
    float peak = peak_magnitude(t, n, threads);
    float twice_peak = 2.0f * (peak < 1e-12f ? 1e-12f : peak); /* clamp_min keeps NaN */
    int nt = team(n, threads);
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float unit = clampf(t[i] / twice_peak + 0.5f, 0.0f, 1.0f);
        out[i] = (2.0f * (rintf(unit * levels) / levels) - 1.0f) * scale;
    }
}

/* The eager _dorefa_backward_kernel: through the clamp (open interval), t / (2 peak), the max (shared by its ties)
 * unless detach_max, and tanh' = 1 - t^2. */
void dorefa_backward(const float *restrict grad, const float *restrict t, float *restrict grad_w, int64_t n,
                     float scale, int detach_max, int threads) {
    float raw_peak = peak_magnitude(t, n, threads);
    float twice_peak = 2.0f * (raw_peak < 1e-12f ? 1e-12f : raw_peak);
    float twice_scale = 2.0f * scale;
    int nt = team(n, threads);
    double partial[MAX_THREADS] = {0};
    int64_t tie_count[MAX_THREADS] = {0};
    /* pass 1: grad_w <- d L / d unit; the peak's gradient sum and the number of ties */
#pragma omp parallel num_threads(nt)
    {
        int id = THREAD_ID;
        int64_t begin, end;
        chunk(n, id, TEAM_SIZE, &begin, &end);
        double sum = 0.0;
        int64_t ties = 0;
        for (int64_t i = begin; i < end; i++) {
            float unsat = t[i] / twice_peak + 0.5f;
            float grad_unit = (unsat > 0.0f) & (unsat < 1.0f) ? grad[i] * twice_scale : 0.0f;
            grad_w[i] = grad_unit;
            sum += (double)(grad_unit * t[i]);
            ties += fabsf(t[i]) == raw_peak;
        }
        partial[id] = sum;
        tie_count[id] = ties;
    }
    double sum = 0.0;
    int64_t ties = 0;
    for (int k = 0; k < nt; k++) { sum += partial[k]; ties += tie_count[k]; }
    float grad_peak = 0.0f;
    if (!detach_max && raw_peak > 1e-12f)
        grad_peak = (float)(-sum * 2.0 / ((double)twice_peak * (double)twice_peak)) / (float)ties;
    /* pass 2: grad_w <- (grad_unit / (2 peak) + [|t| = peak] grad_peak sign(t)) (1 - t^2) */
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float grad_t = grad_w[i] / twice_peak;
        float sign = (float)((t[i] > 0.0f) - (t[i] < 0.0f));
        if (fabsf(t[i]) == raw_peak) grad_t = grad_t + grad_peak * sign;
        grad_w[i] = grad_t * (1.0f - t[i] * t[i]);
    }
}

/* ---- QIL, unsigned without gamma (its activations): round(T(v) q) / q (times out_scale) -------------------------- */

void qil_forward(const float *restrict v, float *restrict out, int64_t n, float prune, float clip, float mid,
                 float width, float q, float out_scale, int threads) {
    int nt = team(n, threads);
#pragma omp parallel for simd num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float m = v[i];
        int inside = (m > prune) & (m <= clip);
        float unit = ((inside ? m : mid) - prune) / width;
        float transformed = m > clip ? 1.0f : (inside ? unit : 0.0f);
        out[i] = rintf(transformed * q) / q * out_scale; /* out_scale is 1 without a scale: x * 1 == x exactly */
    }
}

/* grad_v = upstream / width inside (prune, clip]; sums[0] = sum(grad_v) (minus d L / d prune),
 * sums[1] = sum(grad_v * (v - prune) / width) inside (minus d L / d width).
 * Written with vector types: two double reductions under `omp simd` kept their accumulators on the stack (slow). */
void qil_backward(const float *restrict grad, const float *restrict v, float *restrict grad_v, int64_t n, float prune,
                  float clip, float width, float out_scale, double *sums, int threads) {
    double partial[MAX_THREADS][2] = {{0}};
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = THREAD_ID;
        int64_t begin, end;
        chunk(n, t, TEAM_SIZE, &begin, &end);
        float inverse = 1.0f / width; /* gradients need 1e-6 relative, not bits: one multiply instead of two divides */
        doubles8 lanes_grad = {0}, lanes_base = {0};
        int64_t i = begin;
        for (; i + 8 <= end; i += 8) {
            floats8 m = load8(v + i), upstream = load8(grad + i);
            ints8 inside = (m > prune) & (m <= clip);
            floats8 base = (m - prune) * inverse;
            floats8 grad_m = select8(inside, upstream * out_scale * inverse); /* out_scale 1 without a scale */
            store8(grad_v + i, grad_m);
            lanes_grad += __builtin_convertvector(grad_m, doubles8);
            lanes_base += __builtin_convertvector(select8(inside, grad_m * base), doubles8);
        }
        double sum_grad = lane_sum(lanes_grad), sum_base = lane_sum(lanes_base);
        for (; i < end; i++) { /* the last < 8 elements, same operations */
            float m = v[i];
            int inside = (m > prune) & (m <= clip);
            float grad_m = (inside ? grad[i] * out_scale : 0.0f) * inverse;
            grad_v[i] = grad_m;
            sum_grad += (double)grad_m;
            sum_base += (double)(inside ? grad_m * ((m - prune) * inverse) : 0.0f);
        }
        partial[t][0] = sum_grad;
        partial[t][1] = sum_base;
    }
    sums[0] = sum_partials(&partial[0][0], nt, 2);
    sums[1] = sum_partials(&partial[0][1], nt, 2);
}

/* ---- QIL with an exponent gamma and/or signed (its weights): AVX-512 only ------------------------------------------
 * x^gamma and log x come from torch's own SLEEF functions (Sleef_powf16_u10, Sleef_logf16_u10: what torch.pow and
 * torch.log run on an AVX512 CPU), handed over by native.py, so outputs equal torch's reference path bit for bit. No
 * other libm pow does (glibc's powf differs from SLEEF's in the last bit for some inputs), so elsewhere these
 * kernels are absent (qil_vector_math returns 0) and QIL's weights take the compiled kernels. */
#if defined(__AVX512F__)
#include <immintrin.h>

typedef __m512 (*vector_pow)(__m512, __m512);
typedef __m512 (*vector_log)(__m512);
static vector_pow pow16;
static vector_log log16;

int qil_vector_math(void *pow_function, void *log_function) {
    pow16 = (vector_pow)pow_function;
    log16 = (vector_log)log_function;
    return pow16 != 0 && log16 != 0;
}

static inline __mmask16 lanes(int64_t remaining) { return remaining >= 16 ? 0xFFFF : (__mmask16)((1u << remaining) - 1); }

/* torch.sign: 1, -1, or 0 (also for NaN) */
static inline __m512 sign16(__m512 x) {
    __m512 zero = _mm512_setzero_ps();
    __m512 positive = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_GT_OQ), zero, _mm512_set1_ps(1.0f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ), positive, _mm512_set1_ps(-1.0f));
}

static inline __m512 abs16(__m512 x) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF))); }

/* the float32 lanes summed in double, as two 8-lane halves */
static inline __m512d add16(__m512d sum, __m512 x) {
    sum = _mm512_add_pd(sum, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    return _mm512_add_pd(sum, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
}

/* The eager body of _qil_forward_kernel: T(v) = ((m - prune) / width)^gamma inside (prune, clip] of m = |v| (signed)
 * or v, 1 above, 0 below (times sign(v) when signed), then round(T q) / q * out_scale. */
void qil_gamma_forward(const float *restrict v, float *restrict out, int64_t n, float prune, float clip, float mid,
                       float width, float gamma, float q, float out_scale, int is_signed, int has_gamma, int threads) {
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        chunk(n, THREAD_ID, TEAM_SIZE, &begin, &end);
        __m512 prune_v = _mm512_set1_ps(prune), clip_v = _mm512_set1_ps(clip), mid_v = _mm512_set1_ps(mid);
        __m512 width_v = _mm512_set1_ps(width), gamma_v = _mm512_set1_ps(gamma), q_v = _mm512_set1_ps(q);
        __m512 scale_v = _mm512_set1_ps(out_scale), one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
        for (int64_t i = begin; i < end; i += 16) {
            __mmask16 valid = lanes(end - i);
            __m512 x = _mm512_maskz_loadu_ps(valid, v + i);
            __m512 m = is_signed ? abs16(x) : x;
            __mmask16 inside = _mm512_cmp_ps_mask(m, prune_v, _CMP_GT_OQ) & _mm512_cmp_ps_mask(m, clip_v, _CMP_LE_OQ);
            __m512 unit = _mm512_div_ps(_mm512_sub_ps(_mm512_mask_blend_ps(inside, mid_v, m), prune_v), width_v);
            if (has_gamma) unit = pow16(unit, gamma_v);
            __m512 transformed = _mm512_mask_blend_ps(inside, zero, unit);
            transformed = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, clip_v, _CMP_GT_OQ), transformed, one);
            if (is_signed) transformed = _mm512_mul_ps(transformed, sign16(x));
            __m512 codes = _mm512_roundscale_ps(_mm512_mul_ps(transformed, q_v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm512_mask_storeu_ps(out + i, valid, _mm512_mul_ps(_mm512_div_ps(codes, q_v), scale_v));
        }
    }
}

/* The eager body of _qil_backward_kernel: grad_v = upstream d T / d m / width (times sign(v) when signed) inside;
 * sums[0] = sum(grad_m), sums[1] = sum(grad_m * base) inside, sums[2] = sum(upstream * base^gamma * log base) inside
 * (minus d L / d prune, minus d L / d width, d L / d gamma). */
void qil_gamma_backward(const float *restrict grad, const float *restrict v, float *restrict grad_v, int64_t n,
                        float prune, float clip, float width, float gamma, float out_scale, int is_signed,
                        int has_gamma, double *sums, int threads) {
    double partial[MAX_THREADS][3] = {{0}};
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = THREAD_ID;
        int64_t begin, end;
        chunk(n, t, TEAM_SIZE, &begin, &end);
        __m512 prune_v = _mm512_set1_ps(prune), clip_v = _mm512_set1_ps(clip), width_v = _mm512_set1_ps(width);
        __m512 gamma_v = _mm512_set1_ps(gamma), exponent_v = _mm512_set1_ps(gamma - 1.0f);
        __m512 scale_v = _mm512_set1_ps(out_scale), one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
        __m512d sum_grad = _mm512_setzero_pd(), sum_base = _mm512_setzero_pd(), sum_gamma = _mm512_setzero_pd();
        for (int64_t i = begin; i < end; i += 16) {
            __mmask16 valid = lanes(end - i);
            __m512 x = _mm512_maskz_loadu_ps(valid, v + i), upstream = _mm512_maskz_loadu_ps(valid, grad + i);
            __m512 m = is_signed ? abs16(x) : x;
            __mmask16 inside = valid & _mm512_cmp_ps_mask(m, prune_v, _CMP_GT_OQ) & _mm512_cmp_ps_mask(m, clip_v, _CMP_LE_OQ);
            __m512 base = _mm512_div_ps(_mm512_sub_ps(m, prune_v), width_v);
            upstream = _mm512_mul_ps(upstream, scale_v); /* out_scale is 1 without a scale: x * 1 == x exactly */
            if (is_signed) upstream = _mm512_mul_ps(upstream, sign16(x));
            __m512 grad_base = upstream, gamma_term = zero;
            if (has_gamma) {
                __m512 safe = _mm512_mask_blend_ps(inside, one, base); /* outside lanes are masked out below */
                grad_base = _mm512_mul_ps(upstream, _mm512_mul_ps(gamma_v, pow16(safe, exponent_v)));
                gamma_term = _mm512_maskz_mov_ps(inside, _mm512_mul_ps(upstream, _mm512_mul_ps(pow16(safe, gamma_v), log16(safe))));
            }
            __m512 grad_m = _mm512_div_ps(_mm512_maskz_mov_ps(inside, grad_base), width_v);
            _mm512_mask_storeu_ps(grad_v + i, valid, is_signed ? _mm512_mul_ps(grad_m, sign16(x)) : grad_m);
            sum_grad = add16(sum_grad, grad_m);
            sum_base = add16(sum_base, _mm512_maskz_mov_ps(inside, _mm512_mul_ps(grad_m, base)));
            sum_gamma = add16(sum_gamma, gamma_term);
        }
        partial[t][0] = lane_sum((doubles8)sum_grad); /* __m512d and doubles8: the same 8 doubles */
        partial[t][1] = lane_sum((doubles8)sum_base);
        partial[t][2] = lane_sum((doubles8)sum_gamma);
    }
    for (int k = 0; k < 3; k++) sums[k] = sum_partials(&partial[0][k], nt, 3);
}
#else
int qil_vector_math(void *pow_function, void *log_function) { (void)pow_function; (void)log_function; return 0; }
#endif
