/* Oscillation tracking (quantbench/training/oscillation.py, Nagel et al. 2022): one call per training step for all
 * layers, instead of about ten tensor ops per layer and ten over the flat state. Included by native_kernels.c.
 *
 * A value's code is the number of level midpoints (levels[k] + levels[k + 1]) / 2 strictly below it: what
 * torch.bucketize(value, midpoints, right=False) gives (NaN: all of them), with the midpoints computed by the same
 * float32 operations as nearest_codes(). Then, per element of the flat state (layer after layer):
 *   changed = code != old, rising_now = code > old,
 *   oscillated = changed & moved & (rising_now != rising),
 *   frequency += momentum * (oscillated - frequency)   (torch.lerp's small-weight form; torch may fuse the multiply
 *                                                        and add, so frequencies agree to float32 rounding),
 *   rising = changed ? rising_now : rising, moved |= changed, old = code.
 * Flags are bytes (torch.bool), codes int64 (what bucketize returns). Returns 0, or -1 when out of memory. */
#include <stdlib.h>

/* now[i] = the number of midpoints below values[sample ? sample[i] : i]: 8 at a time with N2UQ's threshold lookups
 * (native_n2uq.c: compared one by one up to 16 midpoints, a bucket table and a short search up to 255, torch's
 * binary search beyond or when unsorted), the last < 8 with torch's binary search itself; all count as bucketize. */
static void nearest_levels(const float *values, const int64_t *sample, int64_t count, const float *midpoints,
                           int boundaries, int64_t *now) {
    int method = n2uq_method(midpoints, NULL, boundaries);
    n2uq_search search;
    n2uq_broadcast linear;
    if (method == N2UQ_SEARCH) n2uq_search_prepare(&search, midpoints, boundaries);
    if (method == N2UQ_LINEAR) n2uq_broadcast_fill(&linear, midpoints, boundaries);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        floats8 x;
        if (sample) for (int l = 0; l < 8; l++) x[l] = values[sample[i + l]];
        else x = load8(values + i);
        ints8 found = n2uq_find8(method, midpoints, boundaries, &linear, &search, x);
        for (int l = 0; l < 8; l++) now[i + l] = found[l];
    }
    for (; i < count; i++) now[i] = torch_lower_bound(midpoints, boundaries, values[sample ? sample[i] : i]);
}

int oscillation_step(int layers, const int64_t *value_pointers, const int64_t *sample_pointers,
                     const int64_t *counts, const int64_t *level_pointers, const int64_t *level_counts,
                     int64_t *restrict code, uint8_t *restrict moved, uint8_t *restrict rising,
                     float *restrict frequency, uint8_t *restrict changed, float momentum) {
    float midpoints_buffer[512];
    int64_t offset = 0;
    for (int layer = 0; layer < layers; layer++) {
        const float *values = (const float *)(intptr_t)value_pointers[layer];
        const int64_t *sample = (const int64_t *)(intptr_t)sample_pointers[layer]; /* NULL: every element */
        const float *levels = (const float *)(intptr_t)level_pointers[layer];
        int64_t count = counts[layer], boundaries = level_counts[layer] - 1;
        float *midpoints = boundaries <= 512 ? midpoints_buffer : (float *)malloc((size_t)boundaries * sizeof(float));
        int64_t *now = (int64_t *)malloc((size_t)(count > 0 ? count : 1) * sizeof(int64_t));
        if (midpoints == NULL || now == NULL) {
            if (midpoints != midpoints_buffer) free(midpoints);
            free(now);
            return -1;
        }
        for (int64_t k = 0; k < boundaries; k++) midpoints[k] = (levels[k + 1] + levels[k]) / 2.0f;
        nearest_levels(values, sample, count, midpoints, (int)boundaries, now);
        /* the flat update: element-wise, vectorized */
        int64_t *restrict old = code + offset;
        uint8_t *restrict was_moved = moved + offset, *restrict was_rising = rising + offset;
        uint8_t *restrict flipped = changed + offset;
        float *restrict ema = frequency + offset;
        for (int64_t i = 0; i < count; i++) {
            uint8_t flip = now[i] != old[i], up = now[i] > old[i];
            uint8_t oscillated = flip & was_moved[i] & (up != was_rising[i]);
            ema[i] = ema[i] + momentum * ((oscillated ? 1.0f : 0.0f) - ema[i]);
            was_rising[i] = flip ? up : was_rising[i];
            was_moved[i] |= flip;
            flipped[i] = flip;
            old[i] = now[i];
        }
        if (midpoints != midpoints_buffer) free(midpoints);
        free(now);
        offset += count;
    }
    return 0;
}
