/* One AdamW step over blocks [block_begin, block_end) of a weight (bf16 or float32, as `bf16` says) whose moments
 * are kept in 8 bits (opdkit.optimizer, `optim.moments: 8bit`): the arithmetic of opdkit.optimizer.update_8bit_eager,
 * which is that of update_eager (torch's AdamW, term for term, in float32), on moments decoded from 8-bit codes and
 * encoded again.
 *
 * A block is BLOCK consecutive elements (the last one of a tensor may be shorter) with one float32 scale per moment:
 * its largest magnitude, so each element is coded relative to it, in [-1, 1]. The first moment m is coded as a sign
 * and a 7-bit float (4 exponent bits, 3 mantissa bits: 2^-15 to 1, code 0 is 0); the second moment is kept as its
 * square root s = sqrt(v), the quantity the step divides by, as an 8-bit unsigned float (4 exponent bits, 4 mantissa
 * bits: 2^-15 to 1, codes 6.25% apart), so that it spans the range of |g| rather than of g^2; below its range it
 * rounds up, never to 0 (that would leave eps alone as the step's denominator).
 *
 * Both round stochastically, each keeping what the next step reads linearly unbiased: m, and v = s^2 (up to the next
 * code with probability (x^2 - lo^2) / (hi^2 - lo^2)). Rounded to the nearest code, as bitsandbytes' and torchao's
 * 8-bit AdamW do, a v whose gradients shrink while its block's largest holds the scale up cannot decay: 0.1% a step
 * is under half a code, so its weight steps less and less than float32 AdamW's (tests/test_optimizer_8bit.py: on a
 * least-squares problem, a loss more than 15% above float32 AdamW's after 600 steps, against within 5% of it rounded
 * stochastically). The noise is the bf16 weights' hash, keyed apart: its low 16 bits for m, its high 16 for s.
 *
 * Built without floating-point contraction, fmaf where torch's vectorised kernels fuse, as adamw_bf16.c. */
#include <math.h>

#include "rounding.h"

#define BLOCK 256
#define M_BASE (112u << 3)  /* m's code 1: exponent and 3 mantissa bits of its smallest magnitude, 2^-15 */
#define S_BASE (112u << 4)  /* s's code 1: exponent and 4 mantissa bits of 2^-15 */
#define KEY_MOMENTS 0x632be5abu

static inline uint32_t bits_of(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    return b;
}

static inline float float_of(uint32_t b) {
    float f;
    memcpy(&f, &b, 4);
    return f;
}

static inline float decode_m(uint8_t code) {
    uint32_t magnitude = code & 127u;
    uint32_t b = magnitude ? (magnitude - 1u + M_BASE) << 20 : 0u;
    return float_of(b | ((uint32_t)(code >> 7) << 31));
}

static inline float decode_s(uint8_t code) {
    return float_of(code ? (code - 1u + S_BASE) << 19 : 0u);
}

/* x in [-1, 1], r uniform in [0, 2^16): the 20 mantissa bits the code drops get r (in units of 2^-16 of a code)
 * added before truncation; below 2^-15, 2^-15 with probability |x| / 2^-15, else 0. Selections by masks, so that the
 * loop calling it vectorises. */
static inline uint8_t encode_m(float x, uint32_t r) {
    uint32_t b = bits_of(x), a = b & 0x7fffffffu;
    uint32_t normal = ((a + (r << 4)) >> 20) - M_BASE + 1u;
    uint32_t is_normal = -(uint32_t)(a >= (112u << 23));
    uint32_t below = (uint32_t)((int32_t)(float_of(a & ~is_normal) * 2147483648.0f) > (int32_t)r);  /* |x| 2^31 */
    uint32_t magnitude = (normal & is_normal) | (below & ~is_normal);
    return (uint8_t)((magnitude | ((b >> 31) << 7)) & -(uint32_t)(magnitude != 0u));
}

/* x in [0, 1], r uniform in [0, 2^16): up to the next code with the probability that leaves x^2 unbiased; below
 * 2^-15, 2^-15 unless x is 0 */
static inline uint8_t encode_s(float x, uint32_t r) {
    uint32_t a = bits_of(x), low_bits = a & ~0x7ffffu;
    float low = float_of(low_bits), high = float_of(low_bits + (1u << 19));
    /* up when r / 2^16 < (x^2 - low^2) / (high^2 - low^2), without a division */
    uint32_t up = (uint32_t)((float)(int32_t)r * ((high - low) * (high + low)) < ((x - low) * (x + low)) * 65536.0f);
    uint32_t is_normal = -(uint32_t)(a >= (112u << 23));
    return (uint8_t)((((low_bits >> 19) - S_BASE + 1u + up) & is_normal) | ((uint32_t)(a != 0u) & ~is_normal));
}

/* One block of `size` elements from `start`; `bf16` is a constant where it is inlined, so each loop has no branch */
static inline __attribute__((always_inline)) void update_block(
        void *restrict weight, const void *restrict grad, uint8_t *restrict exp_avg, float *restrict exp_avg_scale,
        uint8_t *restrict exp_avg_sqrt, float *restrict exp_avg_sqrt_scale, int64_t block, int64_t start,
        int64_t size, const int bf16, float decay, float lerp_weight, int low, float beta2, float one_minus_beta2,
        float root_correction, float eps, float neg_step_size, uint32_t key) {
    float m_new[BLOCK], s_new[BLOCK];
    const float m_scale = exp_avg_scale[block], s_scale = exp_avg_sqrt_scale[block];
    uint32_t m_max = 0, s_max = 0;  /* bits of non-negative floats order as the floats */
    for (int64_t j = 0; j < size; j++) {
        const int64_t i = start + j;
        float g = bf16 ? from_bf16(((const uint16_t *)grad)[i]) : ((const float *)grad)[i];
        float w = (bf16 ? from_bf16(((uint16_t *)weight)[i]) : ((float *)weight)[i]) * decay;
        float m0 = decode_m(exp_avg[i]) * m_scale;
        float s0 = decode_s(exp_avg_sqrt[i]) * s_scale;
        float m = fmaf(lerp_weight, g - m0, low ? m0 : g);
        float v = fmaf(one_minus_beta2 * g, g, (s0 * s0) * beta2);
        float s = sqrtf(v);
        w = w + neg_step_size * m / (s / root_correction + eps);
        if (bf16)
            ((uint16_t *)weight)[i] = round_stochastic(w, noise(i, key));
        else
            ((float *)weight)[i] = w;
        m_new[j] = m;
        s_new[j] = s;
        uint32_t ma = bits_of(m) & 0x7fffffffu, sa = bits_of(s);
        m_max = ma > m_max ? ma : m_max;
        s_max = sa > s_max ? sa : s_max;
    }
    exp_avg_scale[block] = float_of(m_max);
    exp_avg_sqrt_scale[block] = float_of(s_max);
    const float m_inverse = m_max ? 1.0f / float_of(m_max) : 0.0f, s_inverse = s_max ? 1.0f / float_of(s_max) : 0.0f;
    for (int64_t j = 0; j < size; j++) {
        const int64_t i = start + j;
        const uint32_t r = hash(i, key ^ KEY_MOMENTS);
        exp_avg[i] = encode_m(m_new[j] * m_inverse, r & 0xffffu);
        exp_avg_sqrt[i] = encode_s(s_new[j] * s_inverse, r >> 16);
    }
}

void adamw_8bit(void *restrict weight, const void *restrict grad, uint8_t *restrict exp_avg,
                float *restrict exp_avg_scale, uint8_t *restrict exp_avg_sqrt, float *restrict exp_avg_sqrt_scale,
                int64_t block_begin, int64_t block_end, int64_t n, int64_t bf16, float decay, float one_minus_beta1,
                float beta2, float one_minus_beta2, float root_correction, float eps, float neg_step_size,
                uint32_t key) {
    const int low = one_minus_beta1 < 0.5f;  /* torch's vectorised lerp, as adamw_bf16.c */
    const float lerp_weight = low ? one_minus_beta1 : one_minus_beta1 - 1.0f;
    for (int64_t block = block_begin; block < block_end; block++) {
        const int64_t start = block * BLOCK, size = (n - start < BLOCK) ? n - start : BLOCK;
        if (bf16)
            update_block(weight, grad, exp_avg, exp_avg_scale, exp_avg_sqrt, exp_avg_sqrt_scale, block, start, size,
                         1, decay, lerp_weight, low, beta2, one_minus_beta2, root_correction, eps, neg_step_size, key);
        else
            update_block(weight, grad, exp_avg, exp_avg_scale, exp_avg_sqrt, exp_avg_sqrt_scale, block, start, size,
                         0, decay, lerp_weight, low, beta2, one_minus_beta2, root_correction, eps, neg_step_size, key);
    }
}
