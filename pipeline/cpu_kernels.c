/* CPU kernels that torch has no fast op for, built and loaded by pipeline/cpu_kernels.py.

   Plain C (no torch headers: it compiles in well under a second), called through ctypes on raw
   pointers, one range of rows per call so that Python threads can split a batch between them
   (ctypes lets go of the GIL for the call). Each kernel's yardstick is the torch op named beside it.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

/* Keys that sort ascending as "largest value first, then smallest column": the float's bits made
   order-preserving (and flipped) in the high half, the column in the low half. */
static inline uint64_t key_of(float v, int64_t col) {
    uint32_t u;
    memcpy(&u, &v, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* a larger float, a larger u */
    return ((uint64_t)~u << 32) | (uint32_t)col;
}

static inline float value_of(uint64_t key) {
    uint32_t u = ~(uint32_t)(key >> 32);
    u = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* Bottom-up merge sort of a[0:n], tmp another n; returns whichever of the two holds the result.
   The merges choose with a conditional move, not a branch: the order of candidates is random, and
   a mispredicted branch per element cost 3x. */
static uint64_t *sort_keys(uint64_t *a, uint64_t *tmp, int64_t n) {
    for (int64_t w = 1; w < n; w *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * w) {
            const int64_t mid = lo + w < n ? lo + w : n, hi = lo + 2 * w < n ? lo + 2 * w : n;
            int64_t i = lo, j = mid, o = lo;
            while (i < mid && j < hi) {
                const uint64_t x = a[i], y = a[j];
                const int take_y = y < x;
                tmp[o++] = take_y ? y : x;
                i += !take_y;
                j += take_y;
            }
            while (i < mid) tmp[o++] = a[i++];
            while (j < hi) tmp[o++] = a[j++];
        }
        uint64_t *s = a;
        a = tmp;
        tmp = s;
    }
    return a;
}

/* LSD radix sort of a[0:n] by the keys' high halves (the values), 8 bits a pass, stable: keys that
   arrive in column order leave with equal values in column order, as sort_keys would order them.
   Returns where the result lies. Twice as fast as sort_keys from a few dozen keys up. */
static uint64_t *radix_sort_values(uint64_t *a, uint64_t *tmp, int64_t n) {
    for (int shift = 32; shift < 64; shift += 8) {
        int64_t cnt[256] = {0};
        for (int64_t i = 0; i < n; i++) cnt[(a[i] >> shift) & 255]++;
        if (cnt[(a[0] >> shift) & 255] == n) continue; /* one digit for all: nothing moves */
        int64_t pos = 0;
        for (int q = 0; q < 256; q++) {
            const int64_t c = cnt[q];
            cnt[q] = pos;
            pos += c;
        }
        for (int64_t i = 0; i < n; i++) tmp[cnt[(a[i] >> shift) & 255]++] = a[i];
        uint64_t *s = a;
        a = tmp;
        tmp = s;
    }
    return a;
}

/* keys in column order -> sorted; either sort gives the same order */
static uint64_t *sort_row_keys(uint64_t *a, uint64_t *tmp, int64_t n) {
    return n > 32 ? radix_sort_values(a, tmp, n) : sort_keys(a, tmp, n);
}

/* topk_rows_f32 -- torch.topk(z + bias, k, dim=1, sorted=True) for rows lo..hi
 *
 *   z    [B, m] fp32, row-major
 *   bias [m] fp32, or NULL for none: added to each row as it is read, so that the GEMM before
 *        need not first broadcast it into z (a pass over all of z)
 *   vals [B, k] fp32    out: each row's k largest values, largest first
 *   idx  [B, k] int64   out: their columns (among equal values, the smaller column first)
 *   G    groups a row is cut into (m >= 8 G); k <= G
 *
 * One vectorised pass takes the maximum of each of G runs of columns. The k runs with the largest
 * maxima hold k values >= t, the k-th largest maximum, so every value of the top k is >= t: a
 * second pass keeps the few values >= t (about k to 2k of them at G = 2k to 4k), which are sorted
 * (in column order as they come, so a stable sort by value puts equal values by column).
 * Returns 1, with rows left unwritten, at a NaN (torch ranks NaN above every number; the caller
 * falls back to it). */
int topk_rows_f32(const float *z, const float *bias, int64_t m, int64_t k, int64_t G, float *vals,
                  int64_t *idx, int64_t lo, int64_t hi) {
    const int64_t g = (m / G) & ~(int64_t)7; /* columns a run; the last run also takes the tail */
    uint64_t *buf = malloc(2 * (size_t)m * sizeof(uint64_t));
    if (!buf) return 2;
    int nan = 0;
    for (int64_t b = lo; b < hi && !nan; b++) {
        const float *r = z + b * m;
        for (int64_t q = 0; q < G; q++) {
            const int64_t c1 = q == G - 1 ? m : (q + 1) * g;
            int64_t c = q * g;
            float mx = -INFINITY;
#ifdef __AVX__
            __m256 vm = _mm256_set1_ps(-INFINITY), bad = _mm256_setzero_ps();
            for (; c + 8 <= c1; c += 8) {
                const __m256 x = bias ? _mm256_add_ps(_mm256_loadu_ps(r + c), _mm256_loadu_ps(bias + c))
                                      : _mm256_loadu_ps(r + c);
                bad = _mm256_or_ps(bad, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
                vm = _mm256_max_ps(vm, x);
            }
            nan |= _mm256_movemask_ps(bad) != 0;
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            mx = _mm_cvtss_f32(h);
#endif
            for (; c < c1; c++) {
                const float v = bias ? r[c] + bias[c] : r[c];
                nan |= v != v;
                mx = v > mx ? v : mx;
            }
            buf[q] = key_of(mx, q);
        }
        if (nan) break;
        const float t = value_of(sort_row_keys(buf, buf + G, G)[k - 1]);
        int64_t n = 0, c = 0;
#ifdef __AVX__
        const __m256 tv = _mm256_set1_ps(t);
        for (; c + 8 <= m; c += 8) {
            const __m256 x = bias ? _mm256_add_ps(_mm256_loadu_ps(r + c), _mm256_loadu_ps(bias + c))
                                  : _mm256_loadu_ps(r + c);
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(x, tv, _CMP_GE_OQ));
            while (mask) {
                const int q = __builtin_ctz(mask);
                mask &= mask - 1;
                buf[n++] = key_of(bias ? r[c + q] + bias[c + q] : r[c + q], c + q);
            }
        }
#endif
        for (; c < m; c++) {
            const float v = bias ? r[c] + bias[c] : r[c];
            if (v >= t) buf[n++] = key_of(v, c);
        }
        const uint64_t *s = sort_row_keys(buf, buf + m, n);
        for (int64_t q = 0; q < k; q++) {
            vals[b * k + q] = value_of(s[q]);
            idx[b * k + q] = (uint32_t)s[q];
        }
    }
    free(buf);
    return nan;
}
