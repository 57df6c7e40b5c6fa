/* N2UQ's activations (quantizers/kernels/n2uq.py): included by native_kernels.c (its rules hold here).
 *
 * Forward: out_step * (code + lowest), code = how many cell midpoints x exceeds. Backward: each element's cell (how
 * many inner edges it exceeds), grad_x = (inside ? grad * out_step : 0) / width[cell], the out_step gradient and the
 * per-cell sums the range parameters need.
 *
 * Lookups equal torch.bucketize(x, thresholds, right=False), the reference's, bit for bit. On sorted thresholds that
 * is the number of thresholds t with !(t >= x): NaN exceeds them all (the top code and cell, as in the reference; the
 * compiled comparison chains give NaN code 0). Up to 16 cells the thresholds are compared one by one and a cell's
 * edge, width and midpoint come from 16-entry tables held in registers (AVX2 permutes; a gather costs ~12 cycles on
 * AMD Zen 3); up to 255 (8-bit layers) a bucket table narrows each search to a window of a few thresholds. Unsorted
 * thresholds (float rounding of very narrow cells can swap two midpoints) and more than 255 take torch's own binary
 * search, whose result on them the reference has too.
 *
 * The per-cell sums are a scalar scatter (cells repeat within a vector) into 8 interleaved copies per thread, each
 * element adding its (grad_x, grad_x * fraction) pair as one double pair.
 */
#include <stdlib.h>
#if defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#define N2UQ_LINEAR_MAX 16  /* up to this many cells: compare with each threshold */
#define N2UQ_SEARCH_MAX 255 /* up to this many: bucket table and search; above, torch's binary search */
#define N2UQ_BUCKETS 1024   /* >= 4 per threshold: evenly spread thresholds leave at most one in a bucket */
#define N2UQ_COPIES 8       /* element i adds to copy i % 8 (its lane): consecutive adds do not wait on each other */
#define N2UQ_BLOCK 256      /* backward: a vector pass over a block, then its scatter (the block stays in L1) */

enum { N2UQ_LINEAR, N2UQ_SEARCH, N2UQ_EXACT };

/* torch's cus_lower_bound (ATen Bucketization.cpp): bucketize(right=False) on any table, sorted or not */
static int torch_lower_bound(const float *values, int count, float x) {
    int start = 0, end = count;
    while (start < end) {
        int mid = start + ((end - start) >> 1);
        if (!(values[mid] >= x)) start = mid + 1;
        else end = mid;
    }
    return start;
}

static int n2uq_sorted(const float *values, int count) {
    for (int j = 1; j < count; j++)
        if (!(values[j - 1] <= values[j])) return 0; /* also NaN */
    return count < 1 || values[0] == values[0];
}

static inline floats8 blend8(ints8 mask, floats8 yes, floats8 no) {
    return (floats8)(((ints8)yes & mask) | ((ints8)no & ~mask));
}

/* table[index] per lane (AVX2: one gather instruction) */
static inline floats8 gather8(const float *table, ints8 index) {
#ifdef __AVX2__
    return (floats8)_mm256_i32gather_ps(table, (__m256i)index, 4);
#else
    floats8 out;
    for (int l = 0; l < 8; l++) out[l] = table[index[l]];
    return out;
#endif
}

static inline ints8 gather8i(const int32_t *table, ints8 index) {
#ifdef __AVX2__
    return (ints8)_mm256_i32gather_epi32((const int *)table, (__m256i)index, 4);
#else
    ints8 out;
    for (int l = 0; l < 8; l++) out[l] = table[index[l]];
    return out;
#endif
}

/* Up to 16 values, for lookup16: the first 8 and the next 8 */
typedef struct { floats8 low, high; } n2uq_table16;

static void n2uq_table16_fill(n2uq_table16 *table, const float *values, int count) {
    for (int l = 0; l < 8; l++) {
        table->low[l] = l < count ? values[l] : 0.0f;
        table->high[l] = l + 8 < count ? values[l + 8] : 0.0f;
    }
}

/* table[index] per lane for index < 16 (AVX2: two permutes and a blend, no memory access) */
static inline floats8 lookup16(const n2uq_table16 *table, ints8 index) {
#ifdef __AVX2__
    floats8 low = (floats8)_mm256_permutevar8x32_ps((__m256)table->low, (__m256i)index);
    floats8 high = (floats8)_mm256_permutevar8x32_ps((__m256)table->high, (__m256i)index);
    return blend8(index > 7, high, low);
#else
    floats8 out;
    for (int l = 0; l < 8; l++) out[l] = index[l] < 8 ? table->low[index[l]] : table->high[index[l] - 8];
    return out;
#endif
}

/* ---- bucketed search over up to 255 sorted thresholds ---------------------------------------------------------
 * bucket(x) = (int)clamp((x - origin) * scale, 0, BUCKETS - 1) is monotone in x (each float step is), so a threshold
 * in a lower bucket than x's is below x and one in a higher bucket is above it: x exceeds first[bucket(x)] thresholds
 * plus some of those in its own bucket, which a branchless binary search over a window of 2^steps - 1 (padded with
 * +inf) counts. Exact whatever the rounding, as thresholds and inputs go through the same float operations. */

typedef struct {
    int count, steps;
    float origin, scale;
    int32_t first[N2UQ_BUCKETS];             /* thresholds in lower buckets */
    float padded[2 * (N2UQ_SEARCH_MAX + 1)]; /* the thresholds, then +inf: every window stays inside */
} n2uq_search;

static inline int n2uq_bucket(const n2uq_search *s, float x) {
    float t = (x - s->origin) * s->scale;
    t = t > 0.0f ? t : 0.0f; /* NaN (0 * inf when scale overflows) too */
    return (int)(t < (float)(N2UQ_BUCKETS - 1) ? t : (float)(N2UQ_BUCKETS - 1));
}

static inline ints8 n2uq_bucket8(const n2uq_search *s, floats8 x) {
    floats8 t = (x - s->origin) * s->scale;
    t = select8(t > 0.0f, t);
    t = blend8(t < (float)(N2UQ_BUCKETS - 1), t, (floats8){0} + (float)(N2UQ_BUCKETS - 1));
    return __builtin_convertvector(t, ints8);
}

static void n2uq_search_prepare(n2uq_search *s, const float *values, int count) {
    int in_bucket[N2UQ_BUCKETS] = {0}, most = 0;
    s->count = count;
    s->origin = values[0];
    /* no spread (one threshold, all equal) or an infinite one: scale 0, one bucket, a plain binary search */
    float span = values[count - 1] - values[0];
    s->scale = span > 0.0f && span < INFINITY ? (float)N2UQ_BUCKETS / span : 0.0f;
    for (int j = 0; j < count; j++) in_bucket[n2uq_bucket(s, values[j])]++;
    for (int b = 0, below = 0; b < N2UQ_BUCKETS; b++) {
        s->first[b] = below;
        below += in_bucket[b];
        most = in_bucket[b] > most ? in_bucket[b] : most;
    }
    for (s->steps = 0; (1 << s->steps) - 1 < most; s->steps++) {}
    for (int j = 0; j < 2 * (N2UQ_SEARCH_MAX + 1); j++) s->padded[j] = j < count ? values[j] : INFINITY;
}

static inline ints8 n2uq_search8(const n2uq_search *s, floats8 x) {
    ints8 found = gather8i(s->first, n2uq_bucket8(s, x));
    for (int step = (1 << s->steps) >> 1; step > 0; step >>= 1)
        found += (gather8(s->padded, found + (step - 1)) < x) & step;
    ints8 nan = x != x;
    return (found & ~nan) | (s->count & nan);
}

/* ---- lookups -------------------------------------------------------------------------------------------------- */

/* Thresholds broadcast once per call (a loop over them then compares against memory, no broadcast per vector) */
typedef struct {
    int count;
    floats8 values[N2UQ_LINEAR_MAX];
} n2uq_broadcast;

static void n2uq_broadcast_fill(n2uq_broadcast *b, const float *values, int count) {
    b->count = count;
    for (int j = 0; j < count; j++)
        for (int l = 0; l < 8; l++) b->values[j][l] = values[j];
}

static inline ints8 n2uq_count8(const n2uq_broadcast *b, floats8 x) {
    ints8 found = {0};
    for (int j = 0; j < b->count; j++) found -= ~(b->values[j] >= x); /* masks are -1: subtracting counts */
    return found;
}

/* How many of `count` thresholds x exceeds, per lane: LINEAR compares with each (`linear`: them broadcast), SEARCH
 * uses the table, EXACT is torch's search lane by lane. */
static inline ints8 n2uq_find8(int method, const float *values, int count, const n2uq_broadcast *linear,
                               const n2uq_search *search, floats8 x) {
    ints8 found = {0};
    if (method == N2UQ_LINEAR) return n2uq_count8(linear, x);
    if (method == N2UQ_SEARCH) return n2uq_search8(search, x);
    for (int l = 0; l < 8; l++) found[l] = torch_lower_bound(values, count, x[l]);
    return found;
}

static int n2uq_method(const float *midpoints, const float *inner, int cells) {
    if (!n2uq_sorted(midpoints, cells) || (inner && !n2uq_sorted(inner, cells - 1))) return N2UQ_EXACT;
    return cells <= N2UQ_LINEAR_MAX ? N2UQ_LINEAR : (cells <= N2UQ_SEARCH_MAX ? N2UQ_SEARCH : N2UQ_EXACT);
}

/* out[begin, end) = out_step * (code + lowest); called with a constant method, so each is its own loop */
static inline __attribute__((always_inline)) void n2uq_forward_range(
    int method, const float *restrict x, float *restrict out, int64_t begin, int64_t end,
    const float *restrict midpoints, int cells, const n2uq_broadcast *linear, const n2uq_search *search,
    float out_step, float lowest) {
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
        ints8 code = n2uq_find8(method, midpoints, cells, linear, search, load8(x + i));
        store8(out + i, out_step * (__builtin_convertvector(code, floats8) + lowest));
    }
    if (i < end) { /* the last < 8 elements: the same operations on zero-padded lanes, only those kept */
        float v[8] = {0}, result[8];
        memcpy(v, x + i, (size_t)(end - i) * sizeof(float));
        ints8 code = n2uq_find8(method, midpoints, cells, linear, search, load8(v));
        store8(result, out_step * (__builtin_convertvector(code, floats8) + lowest));
        memcpy(out + i, result, (size_t)(end - i) * sizeof(float));
    }
}

/* out = out_step * (code + lowest): the codes are small integers, so code + lowest is exact, then one multiply */
void n2uq_forward(const float *restrict x, float *restrict out, int64_t n, const float *restrict midpoints, int cells,
                  float out_step, float lowest, int threads) {
    n2uq_search search;
    n2uq_broadcast linear;
    int method = n2uq_method(midpoints, NULL, cells), nt = team(n, threads);
    if (method == N2UQ_SEARCH) n2uq_search_prepare(&search, midpoints, cells);
    if (method == N2UQ_LINEAR) n2uq_broadcast_fill(&linear, midpoints, cells);
#pragma omp parallel num_threads(nt)
    {
        int64_t begin, end;
        chunk(n, THREAD_ID, TEAM_SIZE, &begin, &end);
        if (method == N2UQ_LINEAR)
            n2uq_forward_range(N2UQ_LINEAR, x, out, begin, end, midpoints, cells, &linear, &search, out_step, lowest);
        else if (method == N2UQ_SEARCH)
            n2uq_forward_range(N2UQ_SEARCH, x, out, begin, end, midpoints, cells, &linear, &search, out_step, lowest);
        else
            n2uq_forward_range(N2UQ_EXACT, x, out, begin, end, midpoints, cells, &linear, &search, out_step, lowest);
    }
}

/* Whether T_c <= m_c <= T_{c+1} for every cell: then code = cell + (m_cell below x), no second lookup */
static int n2uq_interleaved(const float *edges, const float *midpoints, int cells) {
    for (int c = 0; c < cells; c++)
        if ((c > 0 && !(edges[c] <= midpoints[c])) || (c < cells - 1 && !(midpoints[c] <= edges[c + 1]))) return 0;
    return 1;
}

typedef struct {
    int method, shortcut, cells;
    const float *midpoints, *edges, *widths;
    float out_step, lowest;
    n2uq_broadcast inner_linear, codes_linear; /* LINEAR: the inner edges and the midpoints, broadcast */
    n2uq_table16 edge16, width16, mid16;       /* LINEAR: each cell's edge, width and midpoint */
    n2uq_search inner, codes;                  /* SEARCH: over the inner edges and the midpoints */
    ints8 copy_offset;                         /* lane l of a vector adds to copy l: l * cells */
} n2uq_grid;

/* 8 elements of the backward (the float32 operations of _backward_kernel, in its order): stores grad_x, and for the
 * scatter each one's slot (copy * cells + cell) and (grad_x, grad_x * fraction) pair; adds grad * (code + lowest) to
 * `step`. */
static inline __attribute__((always_inline)) void n2uq_backward8(
    int method, int shortcut, const n2uq_grid *grid, floats8 upstream, floats8 v, float *restrict grad_x,
    int *restrict slot_of, float *restrict pairs, lanes8 *step) {
    int cells = grid->cells;
    ints8 cell, code;
    floats8 left, width;
    if (method == N2UQ_LINEAR) {
        cell = n2uq_count8(&grid->inner_linear, v);
        left = lookup16(&grid->edge16, cell), width = lookup16(&grid->width16, cell);
        code = shortcut ? cell - ~(lookup16(&grid->mid16, cell) >= v) : n2uq_count8(&grid->codes_linear, v);
    } else {
        cell = n2uq_find8(method, grid->edges + 1, cells - 1, NULL, &grid->inner, v);
        left = gather8(grid->edges, cell), width = gather8(grid->widths, cell);
        code = shortcut ? cell - ~(gather8(grid->midpoints, cell) >= v)
                        : n2uq_find8(method, grid->midpoints, cells, NULL, &grid->codes, v);
    }
    float lowest = grid->lowest;
    floats8 fraction = (v - left) / width;
    floats8 linear = (lowest + __builtin_convertvector(cell, floats8)) + fraction;
    ints8 inside = (linear > lowest) & (linear < lowest + (float)cells); /* strict, as the reference's clamp gradient */
    floats8 per_width = select8(inside, upstream * grid->out_step) / width;
    floats8 own = per_width * fraction;
    store8(grad_x, per_width);
    ints8 slot = cell + grid->copy_offset;
    memcpy(slot_of, &slot, sizeof slot);
#ifdef __AVX2__ /* interleave: (grad_x, own) of element 0, of element 1, ... */
    __m256 low = _mm256_unpacklo_ps((__m256)per_width, (__m256)own);
    __m256 high = _mm256_unpackhi_ps((__m256)per_width, (__m256)own);
    _mm256_storeu_ps(pairs, _mm256_permute2f128_ps(low, high, 0x20));
    _mm256_storeu_ps(pairs + 8, _mm256_permute2f128_ps(low, high, 0x31));
#else
    for (int l = 0; l < 8; l++) pairs[2 * l] = per_width[l], pairs[2 * l + 1] = own[l];
#endif
    add_lanes(step, upstream * (__builtin_convertvector(code, floats8) + lowest));
}

/* One block of up to N2UQ_BLOCK elements: grad_x, and their sums added to the thread's copies (`mine`); called
 * with constant method and shortcut, so each is its own loop. */
static inline __attribute__((always_inline)) void n2uq_backward_block(
    int method, int shortcut, const n2uq_grid *grid, const float *restrict grad, const float *restrict x,
    float *restrict grad_x, int len, double *restrict mine, lanes8 *step) {
    int slot_of[N2UQ_BLOCK];
    float pairs[2 * N2UQ_BLOCK]; /* (grad_x, grad_x * fraction) per element */
    int i = 0;
    for (; i + 8 <= len; i += 8)
        n2uq_backward8(method, shortcut, grid, load8(grad + i), load8(x + i), grad_x + i, slot_of + i, pairs + 2 * i,
                       step);
    if (i < len) { /* the last < 8 elements: the same operations on zero-padded lanes, only those kept */
        float upstream[8] = {0}, v[8] = {0}, tail[8];
        memcpy(upstream, grad + i, (size_t)(len - i) * sizeof(float));
        memcpy(v, x + i, (size_t)(len - i) * sizeof(float));
        n2uq_backward8(method, shortcut, grid, load8(upstream), load8(v), tail, slot_of + i, pairs + 2 * i, step);
        memcpy(grad_x + i, tail, (size_t)(len - i) * sizeof(float));
    }
    for (int k = 0; k < len; k++) { /* scatter: no vector form (cells repeat within a vector) */
        double *slot = mine + 2 * (int64_t)slot_of[k];
#ifdef __SSE2__
        __m128d pair = _mm_cvtps_pd(_mm_castpd_ps(_mm_load_sd((const double *)(pairs + 2 * k))));
        _mm_storeu_pd(slot, _mm_add_pd(_mm_loadu_pd(slot), pair));
#else
        slot[0] += (double)pairs[2 * k];
        slot[1] += (double)pairs[2 * k + 1];
#endif
    }
}

/* grad_x; per_cell[c] = sum of grad_x over cell c and per_cell_x[c] = sum of grad_x * fraction there (double, per
 * thread in element order over N2UQ_COPIES interleaved copies, then copies and threads in order: reproducible for a
 * thread count); returns the out_step gradient sum(grad * (code + lowest)). */
double n2uq_backward(const float *restrict grad, const float *restrict x, float *restrict grad_x, int64_t n,
                     const float *restrict midpoints, const float *restrict edges, const float *restrict widths,
                     int cells, float out_step, float lowest, double *restrict per_cell, double *restrict per_cell_x,
                     int threads) {
    n2uq_grid grid = {.method = n2uq_method(midpoints, edges + 1, cells), .cells = cells, .midpoints = midpoints,
                      .edges = edges, .widths = widths, .out_step = out_step, .lowest = lowest};
    grid.shortcut = grid.method != N2UQ_EXACT && n2uq_interleaved(edges, midpoints, cells);
    for (int l = 0; l < 8; l++) grid.copy_offset[l] = l * cells;
    if (grid.method == N2UQ_LINEAR) {
        n2uq_broadcast_fill(&grid.inner_linear, edges + 1, cells - 1);
        n2uq_broadcast_fill(&grid.codes_linear, midpoints, cells);
        n2uq_table16_fill(&grid.edge16, edges, cells);
        n2uq_table16_fill(&grid.width16, widths, cells);
        n2uq_table16_fill(&grid.mid16, midpoints, cells);
    } else if (grid.method == N2UQ_SEARCH) {
        n2uq_search_prepare(&grid.inner, edges + 1, cells - 1);
        if (!grid.shortcut) n2uq_search_prepare(&grid.codes, midpoints, cells);
    }
    int nt = team(n, threads);
    int64_t stride = (int64_t)N2UQ_COPIES * cells * 2; /* per thread: [copy][cell][sum of grad_x, of grad_x fraction] */
    double *sums = calloc((size_t)(nt * stride), sizeof(double));
    double partial[MAX_THREADS] = {0};
    if (sums == NULL) {
        for (int c = 0; c < cells; c++) per_cell[c] = per_cell_x[c] = NAN; /* out of memory: visible, not wrong */
        return NAN;
    }
#pragma omp parallel num_threads(nt)
    {
        int t = THREAD_ID;
        int64_t begin, end;
        chunk(n, t, TEAM_SIZE, &begin, &end);
        double *mine = sums + t * stride;
        lanes8 step = {{0}, {0}};
        for (int64_t first = begin; first < end; first += N2UQ_BLOCK) {
            int len = end - first < N2UQ_BLOCK ? (int)(end - first) : N2UQ_BLOCK;
            const float *g = grad + first, *v = x + first;
            float *out = grad_x + first;
            if (grid.method == N2UQ_LINEAR && grid.shortcut)
                n2uq_backward_block(N2UQ_LINEAR, 1, &grid, g, v, out, len, mine, &step);
            else if (grid.method == N2UQ_LINEAR)
                n2uq_backward_block(N2UQ_LINEAR, 0, &grid, g, v, out, len, mine, &step);
            else if (grid.method == N2UQ_SEARCH && grid.shortcut)
                n2uq_backward_block(N2UQ_SEARCH, 1, &grid, g, v, out, len, mine, &step);
            else if (grid.method == N2UQ_SEARCH)
                n2uq_backward_block(N2UQ_SEARCH, 0, &grid, g, v, out, len, mine, &step);
            else
                n2uq_backward_block(N2UQ_EXACT, 0, &grid, g, v, out, len, mine, &step);
        }
        for (int copy = 1; copy < N2UQ_COPIES; copy++)
            for (int j = 0; j < 2 * cells; j++) mine[j] += mine[copy * cells * 2 + j];
        partial[t] = lane_sum(step);
    }
    for (int c = 0; c < cells; c++) {
        double total = 0.0, total_x = 0.0;
        for (int t = 0; t < nt; t++) {
            total += sums[t * stride + 2 * c];
            total_x += sums[t * stride + 2 * c + 1];
        }
        per_cell[c] = total;
        per_cell_x[c] = total_x;
    }
    free(sums);
    return sum_partials(partial, nt, 1);
}
