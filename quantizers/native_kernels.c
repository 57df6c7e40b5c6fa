/* quantbench's native CPU kernels: one pass forward, one pass backward, float32, for the activation-sized work of
 * lsq / fixed, pact and qil (unsigned, no gamma). Loaded by quantizers/native.py through ctypes.
 *
 * Each kernel does exactly the float32 operations of its Python body in quantizers/primitives.py, in the same order
 * (built with -ffp-contract=off, so no fused multiply-add changes a rounding), so outputs equal the reference path
 * bit for bit. rintf rounds half to even, as torch.round. Parameter gradients are summed in double, per thread in a
 * fixed order, so they are reproducible for a given thread count.
 */
#include <math.h>
#include <stdint.h>
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
    double total = 0.0;
    for (int t = 0; t < nt; t++) /* entries of threads OpenMP did not start stay 0 */
        total += partial[t];
    return total;
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

/* returns d L / d alpha: grad where v >= alpha, -grad where v <= -alpha (signed) */
double pact_backward(const float *restrict grad, const float *restrict v, float *restrict grad_v, int64_t n,
                     float alpha, int is_signed, int threads) {
    double partial[MAX_THREADS] = {0};
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = THREAD_ID;
        int64_t begin, end;
        chunk(n, t, TEAM_SIZE, &begin, &end);
        double sum = 0.0;
        if (is_signed) {
#pragma omp simd reduction(+ : sum)
            for (int64_t i = begin; i < end; i++) {
                int upper = v[i] >= alpha, lower = v[i] <= -alpha;
                grad_v[i] = (upper | lower) ? 0.0f : grad[i];
                sum += (double)(upper ? grad[i] : (lower ? -grad[i] : 0.0f));
            }
        } else {
#pragma omp simd reduction(+ : sum)
            for (int64_t i = begin; i < end; i++) {
                int upper = v[i] >= alpha;
                grad_v[i] = ((v[i] >= 0.0f) & !upper) ? grad[i] : 0.0f;
                sum += (double)(upper ? grad[i] : 0.0f);
            }
        }
        partial[t] = sum;
    }
    double total = 0.0;
    for (int t = 0; t < nt; t++) /* entries of threads OpenMP did not start stay 0 */
        total += partial[t];
    return total;
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
 * sums[1] = sum(grad_v * (v - prune) / width) inside (minus d L / d width) */
void qil_backward(const float *restrict grad, const float *restrict v, float *restrict grad_v, int64_t n, float prune,
                  float clip, float width, float out_scale, double *sums, int threads) {
    double partial[MAX_THREADS][2] = {{0}};
    int nt = team(n, threads);
#pragma omp parallel num_threads(nt)
    {
        int t = THREAD_ID;
        int64_t begin, end;
        chunk(n, t, TEAM_SIZE, &begin, &end);
        double sum_grad = 0.0, sum_base = 0.0;
        float inverse = 1.0f / width; /* gradients need 1e-6 relative, not bits: one multiply instead of two divides */
#pragma omp simd reduction(+ : sum_grad, sum_base)
        for (int64_t i = begin; i < end; i++) {
            float m = v[i];
            int inside = (m > prune) & (m <= clip);
            float base = (m - prune) * inverse;
            float grad_m = (inside ? grad[i] * out_scale : 0.0f) * inverse; /* out_scale 1 without a scale */
            grad_v[i] = grad_m;
            sum_grad += (double)grad_m;
            sum_base += (double)(inside ? grad_m * base : 0.0f);
        }
        partial[t][0] = sum_grad;
        partial[t][1] = sum_base;
    }
    sums[0] = sums[1] = 0.0;
    for (int t = 0; t < nt; t++) { /* entries of threads OpenMP did not start stay 0 */
        sums[0] += partial[t][0];
        sums[1] += partial[t][1];
    }
}
