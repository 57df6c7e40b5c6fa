/* quantbench's native CPU kernels: one pass forward, one pass backward, float32, for the activation-sized work of
 * lsq / fixed, pact and qil (unsigned, no gamma), DoReFa weights, (native_qil_gamma.c, on AVX-512 and AVX2)
 * QIL's signed / gamma weights and (native_n2uq.c) N2UQ's activations.
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
typedef float floats4 __attribute__((vector_size(16)));
typedef double doubles4 __attribute__((vector_size(32)));

static inline floats8 load8(const float *p) { floats8 x; memcpy(&x, p, sizeof x); return x; }
static inline void store8(float *p, floats8 x) { memcpy(p, &x, sizeof x); }
/* mask ? x : +0.0 (mask lanes are all ones or all zeros) */
static inline floats8 select8(ints8 mask, floats8 x) { return (floats8)((ints8)x & mask); }

/* 8 double accumulators, lane j summing element j of every 8-float block, as two 4-double halves: one 64-byte
 * vector would live on the stack where the target has no 64-byte registers (AVX2), three times slower. */
typedef struct { doubles4 low, high; } lanes8;

static inline void add_lanes(lanes8 *sum, floats8 x) {
    floats4 low, high;
    memcpy(&low, &x, sizeof low);
    memcpy(&high, (const char *)&x + sizeof low, sizeof high);
    sum->low += __builtin_convertvector(low, doubles4);
    sum->high += __builtin_convertvector(high, doubles4);
}

static inline double lane_sum(lanes8 lanes) {
    double sum = 0.0;
    for (int j = 0; j < 4; j++) sum += lanes.low[j];
    for (int j = 0; j < 4; j++) sum += lanes.high[j];
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
        lanes8 lanes = {{0}, {0}};
        int64_t i = begin;
        for (; i + 8 <= end; i += 8) {
            floats8 x = load8(v + i), upstream = load8(grad + i);
            ints8 upper = x >= alpha;
            /* signed: pass strictly inside (-alpha, alpha); unsigned: in [0, alpha) */
            ints8 lower = is_signed ? (x <= -alpha) & ~upper : upper & 0;
            ints8 pass = is_signed ? ~(upper | lower) : (x >= 0.0f) & ~upper;
            store8(grad_v + i, select8(pass, upstream));
            add_lanes(&lanes, (floats8)((ints8)select8(upper, upstream) | (ints8)select8(lower, -upstream)));
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
        lanes8 lanes_grad = {{0}, {0}}, lanes_base = {{0}, {0}};
        int64_t i = begin;
        for (; i + 8 <= end; i += 8) {
            floats8 m = load8(v + i), upstream = load8(grad + i);
            ints8 inside = (m > prune) & (m <= clip);
            floats8 base = (m - prune) * inverse;
            floats8 grad_m = select8(inside, upstream * out_scale * inverse); /* out_scale 1 without a scale */
            store8(grad_v + i, grad_m);
            add_lanes(&lanes_grad, grad_m);
            add_lanes(&lanes_base, select8(inside, grad_m * base));
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

/* QIL with an exponent gamma and/or signed (its weights): vector pow / log from torch, AVX-512 or AVX2 */
#include "native_qil_gamma.c"

/* N2UQ's activations: threshold lookups equal to torch.bucketize, per-cell sums */
#include "native_n2uq.c"

/* Oscillation tracking of quantbench's training loop: codes by nearest level and the flip EMA, all layers at once */
#include "native_oscillation.c"
