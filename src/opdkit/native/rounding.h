/* What opdkit's AdamW kernels share: bf16 widening, stochastic rounding to bf16, and the noise that drives it (a
 * 32-bit hash of an element's index and a key: opdkit.optimizer.noise in torch operators). */
#ifndef OPDKIT_ROUNDING_H
#define OPDKIT_ROUNDING_H
#include <stdint.h>
#include <string.h>

static inline float from_bf16(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t round_stochastic(float f, uint32_t noise) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)((bits + noise) >> 16);
}

static inline uint32_t hash(int64_t index, uint32_t key) {
    uint32_t x = ((uint32_t)index * 0x9e3779b1u) ^ key;
    x = ((x >> 16) ^ x) * 0x45d9f3bu;
    x = ((x >> 16) ^ x) * 0x45d9f3bu;
    return (x >> 16) ^ x;
}

static inline uint32_t noise(int64_t index, uint32_t key) {
    return hash(index, key) & 0xffffu;
}

#endif
