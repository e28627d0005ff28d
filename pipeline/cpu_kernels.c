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

/* ---- The encoder's top-k through a bf16 GEMM, exactly ------------------------------------------

   A bf16 GEMM runs 2.5x faster than fp32's on a CPU with AVX512-BF16 or AMX, but a top-k read
   straight off it could pick other latents than fp32's. So it only screens: with x = xh + xl and
   W_j = Wh_j + Wl_j split exactly into bf16 parts and what rounding left,

     |s_j - <x, W_j>| <= |xl| |Wh_j| + |xh| |Wl_j| + |xl| |Wl_j| + (fp32 summation) + (bf16 output)

   (Cauchy-Schwarz on each cross term), where s = xh @ Wh.T as the GEMM returns it. Every latent
   whose upper bound reaches the k-th largest lower bound is a candidate; only the candidates'
   z_j = <x, W_j> + bias_j are computed in fp32, and the top k of those is the top k of the fp32
   z over all latents: every other latent's z lies below the k candidates' lower bounds. */

/* bf16 of a float, rounded to nearest even; below FLT_MIN to zero (a bf16 GEMM may read those as
   zero, and then the split x = xh + xl would not be what it multiplied). */
static inline uint16_t bf16_of(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) == 0) return (uint16_t)((u >> 16) & 0x8000u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float f32_of_bf16(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* v rounded up to a float (a bound must not shrink in the rounding, subnormal or not) */
static inline float float_up(double v) {
    const float f = (float)v;
    return (double)f < v ? nextafterf(f, INFINITY) : f;
}

/* bf16_rows -- rows lo..hi of a [rows, d] fp32 -> out [rows, d] bf16 (torch.bfloat16's bits), and
 * nh [rows], nl [rows]: the 2-norms of each row's bf16 part and of what rounding left (a = bf16
 * part + rest, exactly), both rounded up. The squares are summed in double: in float, a row of
 * 1e-25s would have norm 0 and one of 1e20s an infinite one. Returns 1 at a value that is not
 * finite, rounds to infinity, or has a norm past float's range. */
int bf16_rows(const float *a, int64_t d, uint16_t *out, float *nh, float *nl, int64_t lo, int64_t hi) {
    int bad = 0;
    /* double sums of d / 8 squares a lane: relative error far under this */
    const double up = 1.0 + ((double)d + 16) * 0x1p-52;
    for (int64_t r = lo; r < hi; r++) {
        const float *x = a + r * d;
        uint16_t *o = out + r * d;
        double sh[8] = {0}, sl[8] = {0};
        int64_t c = 0;
#ifdef __AVX512F__
        /* bf16_of 16 at a time, the squares summed in double lanes */
        __m512d h0 = _mm512_setzero_pd(), h1 = _mm512_setzero_pd(), l0 = _mm512_setzero_pd(),
                l1 = _mm512_setzero_pd();
        const __m512i expo = _mm512_set1_epi32(0x7f800000), one = _mm512_set1_epi32(1),
                      half = _mm512_set1_epi32(0x7fff), sign = _mm512_set1_epi32((int)0x80000000u);
        __mmask16 inf = 0;
        for (; c + 16 <= d; c += 16) {
            const __m512 v = _mm512_loadu_ps(x + c);
            const __m512i u = _mm512_castps_si512(v);
            const __mmask16 normal = _mm512_test_epi32_mask(u, expo);
            const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one); /* ties to even */
            const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(half, odd));
            const __m512i hb = _mm512_mask_blend_epi32(normal, _mm512_and_si512(u, sign),
                                                       _mm512_andnot_si512(_mm512_set1_epi32(0xffff), r));
            inf |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(hb, expo), expo);
            _mm256_storeu_si256((__m256i *)(o + c), _mm512_cvtepi32_epi16(_mm512_srli_epi32(hb, 16)));
            const __m512 fh = _mm512_castsi512_ps(hb), fl = _mm512_sub_ps(v, fh);
            const __m512d a0 = _mm512_cvtps_pd(_mm512_castps512_ps256(fh)),
                          a1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(fh), 1))),
                          b0 = _mm512_cvtps_pd(_mm512_castps512_ps256(fl)),
                          b1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(fl), 1)));
            h0 = _mm512_fmadd_pd(a0, a0, h0);
            h1 = _mm512_fmadd_pd(a1, a1, h1);
            l0 = _mm512_fmadd_pd(b0, b0, l0);
            l1 = _mm512_fmadd_pd(b1, b1, l1);
        }
        bad |= inf != 0;
        _mm512_storeu_pd(sh, _mm512_add_pd(h0, h1));
        _mm512_storeu_pd(sl, _mm512_add_pd(l0, l1));
#endif
        for (; c + 8 <= d; c += 8)
            for (int l = 0; l < 8; l++) {
                const uint16_t h = bf16_of(x[c + l]);
                const double fh = f32_of_bf16(h), fl = x[c + l] - (float)fh;
                o[c + l] = h;
                sh[l] += fh * fh;
                sl[l] += fl * fl;
                bad |= (h & 0x7f80) == 0x7f80;
            }
        for (; c < d; c++) {
            const uint16_t h = bf16_of(x[c]);
            const double fh = f32_of_bf16(h), fl = x[c] - (float)fh;
            o[c] = h;
            sh[0] += fh * fh;
            sl[0] += fl * fl;
            bad |= (h & 0x7f80) == 0x7f80;
        }
        double th = 0, tl = 0;
        for (int l = 0; l < 8; l++) {
            th += sh[l];
            tl += sl[l];
        }
        nh[r] = float_up(sqrt(th * up) * (1 + 0x1p-50));
        nl[r] = float_up(sqrt(tl * up) * (1 + 0x1p-50));
        bad |= !(nh[r] <= 3.0e38f);
    }
    return bad;
}

/* <a, b> over d floats, in a fixed order (the same sum whichever thread runs it) */
static inline float dot_f32(const float *a, const float *b, int64_t d) {
    int64_t c = 0;
#ifdef __AVX512F__
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(),
           s3 = _mm512_setzero_ps();
    for (; c + 64 <= d; c += 64) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 16), _mm512_loadu_ps(b + c + 16), s1);
        s2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 32), _mm512_loadu_ps(b + c + 32), s2);
        s3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c + 48), _mm512_loadu_ps(b + c + 48), s3);
    }
    for (; c + 16 <= d; c += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), s0);
    if (c < d) {
        const __mmask16 mk = (__mmask16)((1u << (d - c)) - 1);
        s1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, a + c), _mm512_maskz_loadu_ps(mk, b + c), s1);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
#else
    float s[8] = {0};
    for (; c + 8 <= d; c += 8)
        for (int l = 0; l < 8; l++) s[l] += a[c + l] * b[c + l];
    for (; c < d; c++) s[0] += a[c] * b[c];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
#endif
}

/* A tile's (row, column) pairs: their columns, rows, the order dots_by_column takes them in, the
   bounds on z and z itself. */
typedef struct {
    int32_t *col, *row, *order;
    float *lo, *up, *z;
    int64_t cap;
} Pairs;

/* room for cap pairs; 0 where memory ran out (every array still valid, for pairs_free) */
static int pairs_reserve(Pairs *p, int64_t cap) {
    int32_t **ints[] = {&p->col, &p->row, &p->order};
    float **floats[] = {&p->lo, &p->up, &p->z};
    for (int i = 0; i < 3; i++) {
        int32_t *a = realloc(*ints[i], (size_t)cap * sizeof(int32_t));
        if (!a) return 0;
        *ints[i] = a;
        float *f = realloc(*floats[i], (size_t)cap * sizeof(float));
        if (!f) return 0;
        *floats[i] = f;
    }
    p->cap = cap;
    return 1;
}

static void pairs_free(Pairs *p) {
    free(p->col);
    free(p->row);
    free(p->order);
    free(p->lo);
    free(p->up);
    free(p->z);
}

/* pz[p] = <x[prow[p]], W[pcol[p]]> for the np pairs, taken in column order (a counting sort by
   column into order, with count [n + 1] as scratch): each W row comes from memory once for all the
   pairs that share it, while the rows of x stay in cache. */
static void dots_by_column(const float *x, const float *W, int64_t d, int64_t n, const int32_t *prow,
                           const int32_t *pcol, int64_t np, int32_t *count, int32_t *order, float *pz) {
    memset(count, 0, ((size_t)n + 1) * sizeof(int32_t));
    for (int64_t p = 0; p < np; p++) count[pcol[p] + 1]++;
    for (int64_t c = 0; c < n; c++) count[c + 1] += count[c];
    for (int64_t p = 0; p < np; p++) order[count[pcol[p]]++] = (int32_t)p;
    for (int64_t q = 0; q < np; q++) {
        const int64_t p = order[q];
        pz[p] = dot_f32(x + (int64_t)prow[p] * d, W + (int64_t)pcol[p] * d, d);
    }
}

/* the k-th largest (k >= 1) of a[0:n], n >= k, no NaN; reorders a (Hoare's selection) */
static float kth_largest(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    const int64_t want = k - 1;
    while (lo < hi) {
        const float pivot = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (a[i] > pivot) i++;
            while (a[j] < pivot) j--;
            if (i <= j) {
                const float s = a[i];
                a[i++] = a[j];
                a[j--] = s;
            }
        }
        if (want <= j)
            hi = j;
        else if (want >= i)
            lo = i;
        else
            return a[want];
    }
    return a[want];
}

/* topk_screened -- topk_rows_f32(x @ W.T, bias) for rows lo..hi, from a bf16 GEMM's s
 *
 *   s          [B, m] bf16: xh @ Wh.T from a GEMM that sums in fp32 (xh, Wh: bf16_rows of x, W)
 *   bias       [m] fp32, or NULL
 *   x          [B, d] fp32; W [m, d] fp32: the operands whose z the top k is of
 *   xnh, xnl   [B]; wnh, wnl [m]: bf16_rows's norms of x's and W's rows
 *   vals, idx  [B, k] fp32, int64   out, as topk_rows_f32's, of z_j = <x, W_j> + bias_j in fp32
 *   G          groups a row is cut into (m >= 8 G), as topk_rows_f32's
 *
 * Per row, one pass takes the G runs' maxima of y = s + bias, whose k-th largest t bounds the k-th
 * largest lower bound L from below (as in topk_rows_f32); a second keeps the few columns whose y
 * comes within twice the largest possible bound of t, and only those get their own bounds, L and
 * the candidates: the columns whose upper bound reaches L. The dots are taken TILE rows at a time in column order, so
 * that each W_j comes from memory once a tile rather than once a candidate, the tile's rows of x
 * staying in cache (at n 4096, k 128 a latent is a candidate of 5% of rows: 13 dots a read of W_j).
 * Then each row's candidates are sorted.
 * Returns 1 at a value that is not finite (the caller takes the fp32 path), 4 where a candidate's z
 * broke its bound (a GEMM that does not sum in fp32), 2 for memory. */
#define TILE 256
int topk_screened(const uint16_t *s, const float *bias, const float *x, const float *W, int64_t m,
                  int64_t d, const float *xnh, const float *xnl, const float *wnh, const float *wnl,
                  int64_t k, int64_t G, float *vals, int64_t *idx, int64_t lo, int64_t hi) {
    const int64_t g = (m / G) & ~(int64_t)7;
    uint64_t *buf = malloc(2 * (size_t)m * sizeof(uint64_t));
    float *low = malloc((size_t)m * sizeof(float)); /* a row's prefiltered lower bounds, for L */
    int32_t *count = malloc(((size_t)m + 1) * sizeof(int32_t));
    Pairs P = {0};
    int64_t start[TILE + 1];
    int status = !buf || !low || !count || !pairs_reserve(&P, TILE * (4 * k + 64)) ? 2 : 0;
    int32_t *pcol = P.col, *prow = P.row;
    float *plo = P.lo, *pup = P.up, *pz = P.z;
    /* fp32 summation of d terms (the GEMM's, and the dots below): relative error under gamma; the
       bf16 output: 2^-8 of |s|; the bias's two additions and this arithmetic: 2^-21 of |s| + |b| */
    const float gamma = (float)((double)d * 0x1p-24 / (1 - (double)d * 0x1p-24));
    const float slack = 1 + 0x1p-10, U = (float)(0x1p-8 / (1 - 0x1p-8)) * slack + 0x1p-21f, V = 0x1p-21f;
    const float tiny = (float)((double)d * 0x1p-124), big = 3.0e38f;
    float mwh = 0, mwl = 0, mb = 0; /* the columns' largest norms and |bias| */
    for (int64_t c = 0; c < m; c++) {
        mwh = wnh[c] > mwh ? wnh[c] : mwh;
        mwl = wnl[c] > mwl ? wnl[c] : mwl;
        mb = bias && fabsf(bias[c]) > mb ? fabsf(bias[c]) : mb;
    }
    for (int64_t t0 = lo; t0 < hi && !status; t0 += TILE) {
        const int64_t t1 = t0 + TILE < hi ? t0 + TILE : hi;
        int64_t np = 0;
        start[0] = 0;
        for (int64_t b = t0; b < t1 && !status; b++) {
            const uint16_t *sr = s + b * m;
            const float g2 = 2 * gamma * (xnh[b] + xnl[b]);
            const float A = (xnl[b] + g2) * slack, Bc = (xnh[b] + xnl[b] + g2) * slack;
            /* the runs' maxima of y = s + bias (and the row's largest |s|) */
            int bad = 0;
            float smax = 0;
            for (int64_t q = 0; q < G; q++) {
                const int64_t c1 = q == G - 1 ? m : (q + 1) * g;
                int64_t c = q * g;
                float mx = -INFINITY;
#ifdef __AVX2__
                const __m256 vbig = _mm256_set1_ps(big), sign = _mm256_set1_ps(-0.0f);
                __m256 vm = _mm256_set1_ps(-INFINITY), vs = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
                for (; c + 8 <= c1; c += 8) {
                    const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(sr + c))), 16));
                    const __m256 y = bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias + c)) : v;
                    vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(_mm256_andnot_ps(sign, y), vbig, _CMP_NLE_UQ));
                    vm = _mm256_max_ps(vm, y);
                    vs = _mm256_max_ps(vs, _mm256_andnot_ps(sign, v));
                }
                bad |= _mm256_movemask_ps(vbad) != 0;
                float lanes[8], slanes[8];
                _mm256_storeu_ps(lanes, vm);
                _mm256_storeu_ps(slanes, vs);
                for (int l = 0; l < 8; l++) {
                    mx = lanes[l] > mx ? lanes[l] : mx;
                    smax = slanes[l] > smax ? slanes[l] : smax;
                }
#endif
                for (; c < c1; c++) {
                    const float v = f32_of_bf16(sr[c]), y = v + (bias ? bias[c] : 0.0f);
                    bad |= !(fabsf(y) <= big);
                    mx = y > mx ? y : mx;
                    smax = fabsf(v) > smax ? fabsf(v) : smax;
                }
                buf[q] = key_of(mx, q);
            }
            if (bad) {
                status = 1;
                break;
            }
            /* k columns have y >= t, so lower bounds >= t - E (E: the largest any column's bound can
               be), so L >= t - E, and a column whose upper bound reaches L has y >= t - 2E: only
               those few get their own bounds */
            const float t = value_of(sort_row_keys(buf, buf + G, G)[k - 1]);
            const float E = ((A * mwh + Bc * mwl) + (U * smax + (V * mb + tiny))) * (1 + 0x1p-20f);
            const float thr = nextafterf(t - 2 * E, -INFINITY);
            if (np + m > P.cap) { /* room for a whole row's candidates */
                if (!pairs_reserve(&P, 2 * (np + m))) {
                    status = 2;
                    break;
                }
                pcol = P.col, prow = P.row, plo = P.lo, pup = P.up, pz = P.z;
            }
            int64_t nf = np, c = 0;
#ifdef __AVX2__
            const __m256 tv = _mm256_set1_ps(thr);
            for (; c + 8 <= m; c += 8) {
                const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(
                    _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(sr + c))), 16));
                const __m256 y = bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias + c)) : v;
                int mask = _mm256_movemask_ps(_mm256_cmp_ps(y, tv, _CMP_GE_OQ));
                while (mask) {
                    const int q = __builtin_ctz(mask);
                    mask &= mask - 1;
                    pcol[nf++] = (int32_t)(c + q);
                }
            }
#endif
            for (; c < m; c++) {
                const float y = f32_of_bf16(sr[c]) + (bias ? bias[c] : 0.0f);
                if (y >= thr) pcol[nf++] = (int32_t)c;
            }
            for (int64_t p = np; p < nf; p++) {
                const int64_t j = pcol[p];
                const float v = f32_of_bf16(sr[j]), bj = bias ? bias[j] : 0.0f, y = v + bj;
                const float e = (A * wnh[j] + Bc * wnl[j]) + (U * fabsf(v) + (V * fabsf(bj) + tiny));
                plo[p] = y - e;
                pup[p] = y + e;
                low[p - np] = plo[p];
            }
            const float L = kth_largest(low, nf - np, k);
            int64_t kept = np;
            for (int64_t p = np; p < nf; p++)
                if (pup[p] >= L) {
                    pcol[kept] = pcol[p];
                    plo[kept] = plo[p];
                    pup[kept] = pup[p];
                    prow[kept++] = (int32_t)b;
                }
            np = kept;
            start[b - t0 + 1] = np;
        }
        if (status) break;
        dots_by_column(x, W, d, m, prow, pcol, np, count, P.order, pz);
        for (int64_t p = 0; p < np && !status; p++) {
            const float z = pz[p] + (bias ? bias[pcol[p]] : 0.0f);
            if (!(fabsf(z) <= big))
                status = 1;
            else if (!(z >= plo[p] && z <= pup[p]))
                status = 4;
            pz[p] = z;
        }
        if (status) break;
        for (int64_t b = t0; b < t1; b++) {
            const int64_t p0 = start[b - t0], p1 = start[b - t0 + 1];
            for (int64_t p = p0; p < p1; p++) buf[p - p0] = key_of(pz[p], pcol[p]);
            const uint64_t *o = sort_row_keys(buf, buf + m, p1 - p0);
            for (int64_t q = 0; q < k; q++) {
                vals[b * k + q] = value_of(o[q]);
                idx[b * k + q] = (uint32_t)o[q];
            }
        }
    }
    free(buf);
    free(low);
    free(count);
    pairs_free(&P);
    return status;
}
