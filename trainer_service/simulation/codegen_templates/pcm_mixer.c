/* Template for the audio module: a saturating PCM mixer.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>

#ifndef MAX_INPUTS
#define MAX_INPUTS 4u
#endif
/* ---- template body ---- */
/* Mixes signed 16-bit PCM streams with Q8.8 gains into one buffer; the sum is
 * accumulated in 32 bits and saturated once, so loud inputs clip instead of
 * wrapping around into noise. */
#define PREFIX_MAX_INPUTS MAX_INPUTS
#define PREFIX_UNITY_GAIN 256u

int16_t prefix_saturate(int32_t v)
{
    if (v > INT16_MAX) {
        return INT16_MAX;
    }
    if (v < INT16_MIN) {
        return INT16_MIN;
    }
    return (int16_t)v;
}

int prefix_mix(int16_t *out, const int16_t *const *inputs, const uint16_t *gains, size_t n_inputs,
             size_t frames)
{
    size_t f;
    size_t i;
    if (n_inputs > PREFIX_MAX_INPUTS) {
        return -1;
    }
    for (f = 0; f < frames; f++) {
        int32_t acc = 0;
        for (i = 0; i < n_inputs; i++) {
            acc += (int32_t)inputs[i][f] * (int32_t)gains[i] / (int32_t)PREFIX_UNITY_GAIN;
        }
        out[f] = prefix_saturate(acc);
    }
    return 0;
}

uint16_t prefix_peak(const int16_t *buf, size_t frames)
{
    uint16_t peak = 0;
    size_t f;
    for (f = 0; f < frames; f++) {
        int32_t v = buf[f] < 0 ? -(int32_t)buf[f] : (int32_t)buf[f];
        if ((uint32_t)v > peak) {
            peak = (uint16_t)v;
        }
    }
    return peak;
}

int prefix_selftest(void)
{
    static const int16_t a[4] = {30000, -30000, 100, 0};
    static const int16_t b[4] = {10000, -10000, 100, -5};
    const int16_t *inputs[2];
    uint16_t gains[2];
    int16_t out[4];

    inputs[0] = a;
    inputs[1] = b;
    gains[0] = PREFIX_UNITY_GAIN;
    gains[1] = PREFIX_UNITY_GAIN;
    if (prefix_mix(out, inputs, gains, 2, 4) != 0) {
        return 1;
    }
    if (out[0] != INT16_MAX || out[1] != INT16_MIN || out[2] != 200 || out[3] != -5) {
        return 2;
    }
    gains[0] = PREFIX_UNITY_GAIN / 2u;
    gains[1] = 0;
    if (prefix_mix(out, inputs, gains, 2, 4) != 0 || out[0] != 15000 || out[1] != -15000 || out[2] != 50) {
        return 3;
    }
    if (prefix_peak(out, 4) != 15000u || prefix_mix(out, inputs, gains, PREFIX_MAX_INPUTS + 1u, 4) != -1) {
        return 4;
    }
    return 0;
}
