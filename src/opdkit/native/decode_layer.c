/* One decoder layer of a Llama-family model (opdkit.llama_step) for one new token per row, a few rows, in float32
 * arithmetic on float32 or bf16 weights, in one call:
 *   h = rms_norm(x); q, k, v = projections of h (+ biases); per head rms_norm of q and k (Qwen3); rotary embedding
 *   of q and k at the row's position; k and v written into the KV cache at `column`; attention of each query head
 *   over the columns its row holds (key_mask) up to `column`, through its key head (grouped-query attention);
 *   x += o_proj(attended); h = rms_norm(x); x += down(silu(gate(h)) * up(h)).
 * In torch operators this is about 25 operator calls and 7 product calls a layer, whose overhead was a third of a
 * SmolLM2 student's decode step on 2 cores; here the products are columns.h's loops split over OpenMP threads (the
 * runtime torch loaded), the rotary embedding and the attention a head of a row per task, the norms on one thread
 * between barriers. The arithmetic is llama_step's, summed in another order: results differ from it by float
 * rounding (tests/test_fast_paths.py); they do not depend on the number of threads.
 *
 * pointers (addresses, int64): 0 input norm weight; 1-7 the q, k, v, o, gate, up, down weights [n, k] (all float32,
 * or all bf16 where dims[7] is 1); 8-14 their float32 biases or 0; 15 post-attention norm weight; 16, 17 the q
 * and k norm weights or 0; 18, 19 cos and sin [rows, length, head_dim]; 20, 21 this layer's keys and values
 * [rows, kv_heads, length, head_dim]; 22 scratch, float32, decode_layer_scratch(dims, threads) elements.
 * dims: rows, hidden, heads, kv_heads, head_dim, intermediate, length, bf16.
 * constants: the epsilons of the input, post-attention, q and k norms, the attention's scale. */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif
#include <stdint.h>
#include "columns.h"

enum { Q, K, V, O, GATE, UP, DOWN };

/* y [rows, n] = x [rows, k] @ w.T + bias, the columns shared among the threads of the enclosing parallel region */
static void project(const int64_t *pointers, int64_t bf16, int which, const float *x, float *y, int64_t rows,
                    int64_t n, int64_t k) {
    const float *bias = (const float *)pointers[8 + which];
    project_columns(x, (const void *)pointers[1 + which], (int)bf16, y, rows, n, k);
    if (bias) {  /* the same static schedule as the product's: each thread adds to the columns it computed */
        int64_t tasks = (n + COLUMNS - 1) / COLUMNS;
        #pragma omp for schedule(static) nowait
        for (int64_t t = 0; t < tasks; t++)
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = t * COLUMNS; c < n && c < (t + 1) * COLUMNS; c++) y[r * n + c] += bias[c];
    }
}

static void rms_norm(const float *x, const float *weight, float eps, float *out, int64_t n) {
    float squares = 0;
    for (int64_t i = 0; i < n; i++) squares += x[i] * x[i];
    float scale = 1.0f / sqrtf(squares / n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * scale * weight[i];
}

/* x [head_dim] rotated in place by cos, sin [head_dim]: x * cos + rotate_half(x) * sin */
static void rotate(float *x, const float *cos, const float *sin, int64_t head_dim) {
    int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* a dot product in 8 independent lanes, summed at the end: vectorized without reassociating any sum */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lanes[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) lanes[l] += a[i + l] * b[i + l];
    float s = 0;
    for (int l = 0; l < 8; l++) s += lanes[l];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

int64_t decode_layer_scratch(const int64_t *dims, int64_t threads) {
    int64_t rows = dims[0], hidden = dims[1], q = dims[2] * dims[4], kv = dims[3] * dims[4], ffn = dims[5];
    return rows * (2 * hidden + 2 * q + 2 * kv + 2 * ffn) + threads * dims[6];  /* a row of scores per thread */
}

void decode_layer(float *x, const int64_t *pointers, const int64_t *dims, const float *constants,
                  const int64_t *key_mask, int64_t column, int64_t threads) {
    int64_t rows = dims[0], hidden = dims[1], heads = dims[2], kv_heads = dims[3], head_dim = dims[4];
    int64_t ffn = dims[5], length = dims[6], bf16 = dims[7];
    int64_t q_dim = heads * head_dim, kv_dim = kv_heads * head_dim, groups = heads / kv_heads;
    float *h = (float *)pointers[22], *q = h + rows * hidden, *k = q + rows * q_dim, *v = k + rows * kv_dim;
    float *attended = v + rows * kv_dim, *out = attended + rows * q_dim, *gate = out + rows * hidden;
    float *up = gate + rows * ffn, *scores = up + rows * ffn;
    const float *q_norm = (const float *)pointers[16], *k_norm = (const float *)pointers[17];
    const float *cos = (const float *)pointers[18], *sin = (const float *)pointers[19];
    float *keys = (float *)pointers[20], *values = (float *)pointers[21];
    float scaling = constants[4];

    #pragma omp parallel num_threads(threads)
    {
        #pragma omp single
        for (int64_t r = 0; r < rows; r++)
            rms_norm(x + r * hidden, (const float *)pointers[0], constants[0], h + r * hidden, hidden);
        project(pointers, bf16, Q, h, q, rows, q_dim, hidden);
        project(pointers, bf16, K, h, k, rows, kv_dim, hidden);
        project(pointers, bf16, V, h, v, rows, kv_dim, hidden);
        #pragma omp barrier
        /* q and k normed (Qwen3) and rotated at the row's position, k and v written into the cache: a head per task */
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < rows * (heads + kv_heads); t++) {
            int64_t r = t / (heads + kv_heads), head = t % (heads + kv_heads);
            const float *row_cos = cos + (r * length + column) * head_dim;
            const float *row_sin = sin + (r * length + column) * head_dim;
            if (head < heads) {
                float *qh = q + r * q_dim + head * head_dim;
                if (q_norm) rms_norm(qh, q_norm, constants[2], qh, head_dim);
                rotate(qh, row_cos, row_sin, head_dim);
                continue;
            }
            head -= heads;
            float *kh = k + r * kv_dim + head * head_dim;
            if (k_norm) rms_norm(kh, k_norm, constants[3], kh, head_dim);
            rotate(kh, row_cos, row_sin, head_dim);
            int64_t at = ((r * kv_heads + head) * length + column) * head_dim;
            memcpy(keys + at, kh, head_dim * sizeof(float));
            memcpy(values + at, v + r * kv_dim + head * head_dim, head_dim * sizeof(float));
        }
        /* softmax over the columns the row holds, and its own: a query head of a row per task */
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < rows * heads; t++) {
            int64_t r = t / heads, head = t % heads;
            float *row_scores = scores + omp_get_thread_num() * length;
            const float *qh = q + r * q_dim + head * head_dim;
            const float *kh = keys + (r * kv_heads + head / groups) * length * head_dim;
            const float *vh = values + (r * kv_heads + head / groups) * length * head_dim;
            float top = -INFINITY, total = 0;
            for (int64_t c = 0; c <= column; c++) {
                if (!key_mask[r * length + c] && c != column) continue;
                row_scores[c] = dot(qh, kh + c * head_dim, head_dim) * scaling;
                if (row_scores[c] > top) top = row_scores[c];
            }
            float *a = attended + r * q_dim + head * head_dim;
            memset(a, 0, head_dim * sizeof(float));
            for (int64_t c = 0; c <= column; c++) {
                if (!key_mask[r * length + c] && c != column) continue;
                float p = expf(row_scores[c] - top);
                total += p;
                for (int64_t i = 0; i < head_dim; i++) a[i] += p * vh[c * head_dim + i];
            }
            for (int64_t i = 0; i < head_dim; i++) a[i] /= total;
        }
        project(pointers, bf16, O, attended, out, rows, hidden, q_dim);
        #pragma omp barrier
        #pragma omp single
        for (int64_t r = 0; r < rows; r++) {
            for (int64_t i = 0; i < hidden; i++) x[r * hidden + i] += out[r * hidden + i];
            rms_norm(x + r * hidden, (const float *)pointers[15], constants[1], h + r * hidden, hidden);
        }
        project(pointers, bf16, GATE, h, gate, rows, ffn, hidden);
        project(pointers, bf16, UP, h, up, rows, ffn, hidden);
        #pragma omp barrier
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < rows * ffn; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        project(pointers, bf16, DOWN, gate, out, rows, hidden, ffn);
        #pragma omp barrier
        #pragma omp single
        for (int64_t i = 0; i < rows * hidden; i++) x[i] += out[i];
    }
}
