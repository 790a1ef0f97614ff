/* Matrix products at decode time and weights kept in bf16 for float32 arithmetic (opdkit.products):
 *   rows_matmul:      y[r, n] = sum_j x[r, j] * w[n, j] for a few rows r of float32 x and float32 w;
 *   bf16_rows_matmul: the same with w stored in bf16, each weight widened to float32 as it is read (exact: a bf16
 *                     value is a float32 whose low 16 bits are zero), so a step streams half the bytes;
 *   bf16_to_float:    a bf16 tensor widened into a float32 one.
 * The loops are columns.h's: at 4 rows of the SmolLM2 student on an AMD EPYC Zen 3 the LM head streams at about
 * 23 GB/s where torch's product reached 18, and a layer's small projections run 2.5x faster than torch's
 * (docs/performance.md). Sums are taken in another order than torch's, so results differ from its product by float
 * rounding. Threads are OpenMP's (the runtime torch itself loaded), splitting the output columns. Built at first use
 * by opdkit.native. */
#include "columns.h"

void rows_matmul(const float *x, const float *w, float *y, int64_t rows, int64_t n, int64_t k, int64_t threads) {
    #pragma omp parallel num_threads(threads)
    project_columns(x, w, 0, y, rows, n, k);
}

void bf16_rows_matmul(const float *x, const uint16_t *w, float *y, int64_t rows, int64_t n, int64_t k,
                      int64_t threads) {
    #pragma omp parallel num_threads(threads)
    project_columns(x, w, 1, y, rows, n, k);
}

void bf16_to_float(const uint16_t *src, float *dst, int64_t count, int64_t threads) {
    int64_t tasks = (count + 65535) / 65536;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t t = 0; t < tasks; t++) {
        int64_t end = (t + 1) * 65536 < count ? (t + 1) * 65536 : count;
        for (int64_t i = t * 65536; i < end; i++) dst[i] = widen(src[i]);
    }
}
