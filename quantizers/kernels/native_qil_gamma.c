/* QIL with an exponent gamma and/or signed (its weights): included by native_kernels.c (its rules hold here).
 *
 * x^gamma and log x come from torch's own SLEEF functions, handed over by native.py: Sleef_powf16_u10 /
 * Sleef_logf16_u10 where torch runs its AVX512 kernels, Sleef_powf8_u10 / Sleef_logf8_u10 where it runs its AVX2
 * ones (what torch.pow and torch.log call there). No libm pow equals them (glibc's powf differs from SLEEF's in the
 * last bit for some inputs), so without them these kernels are off (qil_vector_math returns 0) and QIL's weights
 * take the compiled kernels.
 *
 * Both forwards also reproduce which elements torch computes with glibc's powf: torch's vectorized loop takes two
 * vectors at a time (16 floats on AVX2, 32 on AVX-512) and the rest of each thread's range through std::pow, with
 * ranges split as at::parallel_for splits them (grain 32768). So their output equals torch.pow's bit for bit, tails
 * included.
 */
#define TORCH_GRAIN 32768 /* at::internal::GRAIN_SIZE: TensorIterator's parallel split */

/* the team at::parallel_for uses: one thread below the grain, else at most one per grain */
static inline int torch_team(int64_t n, int threads) {
    if (threads < 2 || n < TORCH_GRAIN) return 1;
    int64_t grains = (n + TORCH_GRAIN - 1) / TORCH_GRAIN;
    int nt = grains < threads ? (int)grains : threads;
    return nt > MAX_THREADS ? MAX_THREADS : nt;
}

static inline float sign1(float x) { return (float)((x > 0.0f) - (x < 0.0f)); }

/* One element of the forward as torch's scalar loop computes it (std::pow is glibc's powf): the tails that torch's
 * vectorized_loop leaves to its basic loop, fewer than two vectors per thread's range. */
static inline float qil_gamma_forward_one(float x, float prune, float clip, float mid, float width, float gamma,
                                          float q, float out_scale, int is_signed, int has_gamma) {
    float m = is_signed ? fabsf(x) : x;
    int inside = (m > prune) & (m <= clip);
    float unit = ((inside ? m : mid) - prune) / width;
    if (has_gamma) unit = powf(unit, gamma);
    float transformed = m > clip ? 1.0f : (inside ? unit : 0.0f);
    if (is_signed) transformed = transformed * sign1(x);
    return rintf(transformed * q) / q * out_scale;
}

#if defined(__AVX512F__)
#include <immintrin.h>

typedef __m512 (*vector_pow)(__m512, __m512);
typedef __m512 (*vector_log)(__m512);
static vector_pow pow16;
static vector_log log16;

int qil_vector_width(void) { return 16; }

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

/* the 8 double lanes in order */
static inline double lane_sum16(__m512d x) {
    double lanes[8], sum = 0.0;
    _mm512_storeu_pd(lanes, x);
    for (int j = 0; j < 8; j++) sum += lanes[j];
    return sum;
}

#define TORCH_BLOCK 32 /* torch's vectorized_loop: two 16-float vectors per iteration, the rest scalar */

/* The eager body of _qil_forward_kernel: T(v) = ((m - prune) / width)^gamma inside (prune, clip] of m = |v| (signed)
 * or v, 1 above, 0 below (times sign(v) when signed), then round(T q) / q * out_scale. Split and tails as torch's
 * AVX-512 loop: full 32-float blocks through SLEEF, the rest of each thread's range through glibc's powf. */
void qil_gamma_forward(const float *restrict v, float *restrict out, int64_t n, float prune, float clip, float mid,
                       float width, float gamma, float q, float out_scale, int is_signed, int has_gamma, int threads) {
    int nt = torch_team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        chunk(n, THREAD_ID, TEAM_SIZE, &begin, &end);
        __m512 prune_v = _mm512_set1_ps(prune), clip_v = _mm512_set1_ps(clip), mid_v = _mm512_set1_ps(mid);
        __m512 width_v = _mm512_set1_ps(width), gamma_v = _mm512_set1_ps(gamma), q_v = _mm512_set1_ps(q);
        __m512 scale_v = _mm512_set1_ps(out_scale), one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
        int64_t i = begin, vector_end = begin + (end - begin) / TORCH_BLOCK * TORCH_BLOCK;
        for (; i < vector_end; i += 16) {
            __m512 x = _mm512_loadu_ps(v + i);
            __m512 m = is_signed ? abs16(x) : x;
            __mmask16 inside = _mm512_cmp_ps_mask(m, prune_v, _CMP_GT_OQ) & _mm512_cmp_ps_mask(m, clip_v, _CMP_LE_OQ);
            __m512 unit = _mm512_div_ps(_mm512_sub_ps(_mm512_mask_blend_ps(inside, mid_v, m), prune_v), width_v);
            if (has_gamma) unit = pow16(unit, gamma_v);
            __m512 transformed = _mm512_mask_blend_ps(inside, zero, unit);
            transformed = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, clip_v, _CMP_GT_OQ), transformed, one);
            if (is_signed) transformed = _mm512_mul_ps(transformed, sign16(x));
            __m512 codes = _mm512_roundscale_ps(_mm512_mul_ps(transformed, q_v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(codes, q_v), scale_v));
        }
        for (; i < end; i++)
            out[i] = qil_gamma_forward_one(v[i], prune, clip, mid, width, gamma, q, out_scale, is_signed, has_gamma);
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
        partial[t][0] = lane_sum16(sum_grad);
        partial[t][1] = lane_sum16(sum_base);
        partial[t][2] = lane_sum16(sum_gamma);
    }
    for (int k = 0; k < 3; k++) sums[k] = sum_partials(&partial[0][k], nt, 3);
}

#elif defined(__AVX2__)
#include <immintrin.h>

typedef __m256 (*vector_pow)(__m256, __m256);
typedef __m256 (*vector_log)(__m256);
static vector_pow pow8;
static vector_log log8;

int qil_vector_width(void) { return 8; }

int qil_vector_math(void *pow_function, void *log_function) {
    pow8 = (vector_pow)pow_function;
    log8 = (vector_log)log_function;
    return pow8 != 0 && log8 != 0;
}

#define TORCH_BLOCK 16 /* torch's vectorized_loop: two 8-float vectors per iteration, the rest scalar */

/* torch.sign: 1, -1, or 0 (also for NaN) */
static inline __m256 sign8(__m256 x) {
    __m256 zero = _mm256_setzero_ps();
    __m256 positive = _mm256_and_ps(_mm256_cmp_ps(x, zero, _CMP_GT_OQ), _mm256_set1_ps(1.0f));
    return _mm256_blendv_ps(positive, _mm256_set1_ps(-1.0f), _mm256_cmp_ps(x, zero, _CMP_LT_OQ));
}

static inline __m256 abs8(__m256 x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF))); }

/* The eager body of _qil_forward_kernel (see the AVX-512 version), 8 lanes, torch's scalar tails with powf. */
void qil_gamma_forward(const float *restrict v, float *restrict out, int64_t n, float prune, float clip, float mid,
                       float width, float gamma, float q, float out_scale, int is_signed, int has_gamma, int threads) {
    int nt = torch_team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        chunk(n, THREAD_ID, TEAM_SIZE, &begin, &end);
        __m256 prune_v = _mm256_set1_ps(prune), clip_v = _mm256_set1_ps(clip), mid_v = _mm256_set1_ps(mid);
        __m256 width_v = _mm256_set1_ps(width), gamma_v = _mm256_set1_ps(gamma), q_v = _mm256_set1_ps(q);
        __m256 scale_v = _mm256_set1_ps(out_scale), one = _mm256_set1_ps(1.0f);
        int64_t i = begin, vector_end = begin + (end - begin) / TORCH_BLOCK * TORCH_BLOCK;
        for (; i < vector_end; i += 8) {
            __m256 x = _mm256_loadu_ps(v + i);
            __m256 m = is_signed ? abs8(x) : x;
            __m256 inside = _mm256_and_ps(_mm256_cmp_ps(m, prune_v, _CMP_GT_OQ), _mm256_cmp_ps(m, clip_v, _CMP_LE_OQ));
            __m256 unit = _mm256_div_ps(_mm256_sub_ps(_mm256_blendv_ps(mid_v, m, inside), prune_v), width_v);
            if (has_gamma) unit = pow8(unit, gamma_v);
            __m256 transformed = _mm256_and_ps(inside, unit);
            transformed = _mm256_blendv_ps(transformed, one, _mm256_cmp_ps(m, clip_v, _CMP_GT_OQ));
            if (is_signed) transformed = _mm256_mul_ps(transformed, sign8(x));
            __m256 codes = _mm256_round_ps(_mm256_mul_ps(transformed, q_v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(codes, q_v), scale_v));
        }
        for (; i < end; i++) /* torch's scalar remainder */
            out[i] = qil_gamma_forward_one(v[i], prune, clip, mid, width, gamma, q, out_scale, is_signed, has_gamma);
    }
}

/* The eager body of _qil_backward_kernel (see the AVX-512 version), 8 lanes. Gradients need 1e-6 relative, not
 * bits, so the chunks are this file's usual ones and the tail lanes use libm's powf / logf. */
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
        __m256 prune_v = _mm256_set1_ps(prune), clip_v = _mm256_set1_ps(clip), width_v = _mm256_set1_ps(width);
        __m256 gamma_v = _mm256_set1_ps(gamma), exponent_v = _mm256_set1_ps(gamma - 1.0f);
        __m256 scale_v = _mm256_set1_ps(out_scale), one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
        lanes8 sum_grad = {{0}, {0}}, sum_base = {{0}, {0}}, sum_gamma = {{0}, {0}}; /* native_kernels.c's */
        int64_t i = begin;
        for (; i + 8 <= end; i += 8) {
            __m256 x = _mm256_loadu_ps(v + i), upstream = _mm256_loadu_ps(grad + i);
            __m256 m = is_signed ? abs8(x) : x;
            __m256 inside = _mm256_and_ps(_mm256_cmp_ps(m, prune_v, _CMP_GT_OQ), _mm256_cmp_ps(m, clip_v, _CMP_LE_OQ));
            __m256 base = _mm256_div_ps(_mm256_sub_ps(m, prune_v), width_v);
            upstream = _mm256_mul_ps(upstream, scale_v); /* out_scale is 1 without a scale: x * 1 == x exactly */
            if (is_signed) upstream = _mm256_mul_ps(upstream, sign8(x));
            __m256 grad_base = upstream, gamma_term = zero;
            if (has_gamma) {
                __m256 safe = _mm256_blendv_ps(one, base, inside); /* outside lanes are masked out below */
                grad_base = _mm256_mul_ps(upstream, _mm256_mul_ps(gamma_v, pow8(safe, exponent_v)));
                gamma_term = _mm256_and_ps(inside, _mm256_mul_ps(upstream, _mm256_mul_ps(pow8(safe, gamma_v), log8(safe))));
            }
            __m256 grad_m = _mm256_div_ps(_mm256_and_ps(inside, grad_base), width_v);
            _mm256_storeu_ps(grad_v + i, is_signed ? _mm256_mul_ps(grad_m, sign8(x)) : grad_m);
            add_lanes(&sum_grad, (floats8)grad_m);
            add_lanes(&sum_base, (floats8)_mm256_and_ps(inside, _mm256_mul_ps(grad_m, base)));
            add_lanes(&sum_gamma, (floats8)gamma_term);
        }
        double total_grad = lane_sum(sum_grad), total_base = lane_sum(sum_base), total_gamma = lane_sum(sum_gamma);
        for (; i < end; i++) { /* the last < 8 elements, same operations */
            float m = is_signed ? fabsf(v[i]) : v[i];
            int inside = (m > prune) & (m <= clip);
            float base = (m - prune) / width;
            float upstream = grad[i] * out_scale;
            if (is_signed) upstream = upstream * sign1(v[i]);
            float grad_base = upstream, gamma_term = 0.0f;
            if (has_gamma && inside) {
                grad_base = upstream * (gamma * powf(base, gamma - 1.0f));
                gamma_term = upstream * (powf(base, gamma) * logf(base));
            }
            float grad_m = (inside ? grad_base : 0.0f) / width;
            grad_v[i] = is_signed ? grad_m * sign1(v[i]) : grad_m;
            total_grad += (double)grad_m;
            total_base += (double)(inside ? grad_m * base : 0.0f);
            total_gamma += (double)gamma_term;
        }
        partial[t][0] = total_grad;
        partial[t][1] = total_base;
        partial[t][2] = total_gamma;
    }
    for (int k = 0; k < 3; k++) sums[k] = sum_partials(&partial[0][k], nt, 3);
}
#else
int qil_vector_width(void) { return 0; }

int qil_vector_math(void *pow_function, void *log_function) { (void)pow_function; (void)log_function; return 0; }
#endif
