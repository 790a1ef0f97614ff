/* One AdamW step over elements [begin, end) of a bf16 weight, its bf16 gradient and its bf16 moments, in one pass:
 * the arithmetic of opdkit.optimizer.update_eager (torch's AdamW, term for term, in float32), then stochastic
 * rounding back to bf16 with the same noise (opdkit.optimizer.noise: a 32-bit hash of the element's index and the
 * step's key). Built at first use by opdkit.native, without floating-point contraction: every operation rounds once,
 * as written, with fmaf exactly where torch's vectorised kernels fuse (lerp, addcmul). The moments come out as the
 * eager path's to the bit; the square root here is correctly rounded where torch's vectorised one is not always, so
 * a weight can round to the neighbouring bf16 value about once in 65,536 updates (tests/test_optimizer.py). */
#include <math.h>

#include "rounding.h"

void adamw_bf16(uint16_t *restrict weight, const uint16_t *restrict grad, uint16_t *restrict exp_avg,
                uint16_t *restrict exp_avg_sq,
                int64_t begin, int64_t end, float decay, float one_minus_beta1, float beta2,
                float one_minus_beta2, float root_correction, float eps, float neg_step_size, uint32_t key) {
    /* torch's vectorised lerp(self, end, weight), one fused multiply-add: weight < 0.5 ? fma(weight, end - self,
     * self) : fma(weight - 1, end - self, end); the choice is made once, so the loop has no branch and vectorises */
    const int low = one_minus_beta1 < 0.5f;
    const float lerp_weight = low ? one_minus_beta1 : one_minus_beta1 - 1.0f;
    for (int64_t i = begin; i < end; i++) {
        float g = from_bf16(grad[i]);
        float w = from_bf16(weight[i]) * decay;
        float m0 = from_bf16(exp_avg[i]);
        float m = fmaf(lerp_weight, g - m0, low ? m0 : g);
        float v = from_bf16(exp_avg_sq[i]) * beta2;
        v = fmaf(one_minus_beta2 * g, g, v);  /* torch's vectorised addcmul, as built: self + (value * t1) * t2 fused */
        float denom = sqrtf(v) / root_correction + eps;
        w = w + neg_step_size * m / denom;  /* torch's addcdiv: (value * t1) / t2 */
        uint32_t r = noise(i, key);
        weight[i] = round_stochastic(w, r);
        exp_avg[i] = round_stochastic(m, r);
        exp_avg_sq[i] = round_stochastic(v, r);
    }
}
