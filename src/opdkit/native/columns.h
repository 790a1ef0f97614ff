/* The inner loops of a projection of a few float32 rows through float32 or bf16 weights, shared by products.c
 * and decode_layer.c: float_columns and bf16_columns compute the output columns [n0, n1) of y = x @ w.T, reading each
 * pair of w's rows once, from memory, for every row of x (in groups of four, from the cache after the first), with
 * the next pair prefetched; project_columns shares a whole product's columns among threads. A header of static
 * functions: each kernel that includes it is built on its own. */
#ifndef OPDKIT_COLUMNS_H
#define OPDKIT_COLUMNS_H
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define GROUP 4     /* rows of x at once */
#define COLUMNS 32  /* output columns per task: a q, o or down projection of 576 shares evenly among 2 threads */

static inline float widen(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float same(float f) { return f; }

#ifdef __AVX2__
static inline __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline __m256 same8(const float *p) { return _mm256_loadu_ps(p); }
#define VECTOR_LOOP(LOAD8)                                                                                           \
    __m256 acc[2][GROUP];                                                                                             \
    for (int i = 0; i < GROUP; i++) acc[0][i] = acc[1][i] = _mm256_setzero_ps();                                      \
    for (; j + 8 <= k; j += 8) {                                                                                      \
        __builtin_prefetch(w0 + j + 2 * k, 0, 0); /* the next pair of rows, both */                                   \
        __builtin_prefetch(w0 + j + 3 * k, 0, 0);                                                                     \
        __m256 v0 = LOAD8(w0 + j), v1 = LOAD8(w1 + j);                                                                \
        for (int i = 0; i < GROUP; i++) {                                                                             \
            __m256 xi = _mm256_loadu_ps(xr[i] + j);                                                                   \
            acc[0][i] = _mm256_fmadd_ps(v0, xi, acc[0][i]);                                                           \
            acc[1][i] = _mm256_fmadd_ps(v1, xi, acc[1][i]);                                                           \
        }                                                                                                             \
    }                                                                                                                 \
    for (int a = 0; a < 2; a++)                                                                                       \
        for (int i = 0; i < GROUP; i++) {                                                                             \
            __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc[a][i]), _mm256_extractf128_ps(acc[a][i], 1));            \
            q = _mm_add_ps(q, _mm_movehl_ps(q, q));                                                                   \
            s[a][i] = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));                                          \
        }
#else
#define VECTOR_LOOP(LOAD8)
#endif

/* columns [n0, n1) of y for weights of type T, read by LOAD (one) and LOAD8 (eight, AVX2) */
#define COLUMNS_OF(NAME, T, LOAD, LOAD8)                                                                              \
    static void NAME(const float *restrict x, const T *restrict w, float *restrict y, int64_t rows, int64_t n0,      \
                     int64_t n1, int64_t n, int64_t k) {                                                              \
        for (int64_t c = n0; c < n1; c += 2) {                                                                        \
            const T *w0 = w + c * k, *w1 = w + (c + 1 < n1 ? c + 1 : c) * k;                                          \
            for (int64_t r0 = 0; r0 < rows; r0 += GROUP) {                                                            \
                int64_t used = rows - r0 < GROUP ? rows - r0 : GROUP;                                                 \
                const float *xr[GROUP];                                                                               \
                for (int i = 0; i < GROUP; i++) xr[i] = x + (r0 + (i < used ? i : 0)) * k;                            \
                float s[2][GROUP] = {{0}};                                                                            \
                int64_t j = 0;                                                                                        \
                VECTOR_LOOP(LOAD8)                                                                                    \
                for (; j < k; j++)                                                                                    \
                    for (int i = 0; i < GROUP; i++) {                                                                 \
                        s[0][i] += LOAD(w0[j]) * xr[i][j];                                                            \
                        s[1][i] += LOAD(w1[j]) * xr[i][j];                                                            \
                    }                                                                                                 \
                for (int i = 0; i < used; i++) {                                                                      \
                    y[(r0 + i) * n + c] = s[0][i];                                                                    \
                    if (c + 1 < n1) y[(r0 + i) * n + c + 1] = s[1][i];                                                \
                }                                                                                                     \
            }                                                                                                         \
        }                                                                                                             \
    }

COLUMNS_OF(float_columns, float, same, same8)
COLUMNS_OF(bf16_columns, uint16_t, widen, widen8)

/* y [rows, n] = x [rows, k] @ w.T for float32 or bf16 (`bf16`) w, its COLUMNS-wide tasks shared among the threads of
 * the enclosing parallel region (an orphaned `omp for`, without its barrier: the caller places one where needed) */
static void project_columns(const float *x, const void *w, int bf16, float *y, int64_t rows, int64_t n, int64_t k) {
    int64_t tasks = (n + COLUMNS - 1) / COLUMNS;
    #pragma omp for schedule(static) nowait
    for (int64_t t = 0; t < tasks; t++) {
        int64_t n0 = t * COLUMNS, n1 = n0 + COLUMNS < n ? n0 + COLUMNS : n;
        if (bf16)
            bf16_columns(x, (const uint16_t *)w, y, rows, n0, n1, n, k);
        else
            float_columns(x, (const float *)w, y, rows, n0, n1, n, k);
    }
}

#endif
