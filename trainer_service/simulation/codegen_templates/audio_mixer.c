/* Template for the audio_mixer feature: a voice mixer with volume ramps.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifndef VOICES
#define VOICES 4u
#endif
#ifndef RAMP_STEP
#define RAMP_STEP 8u
#endif
/* ---- template body ---- */
/* Voice mixer for a sound server: a fixed set of voices, each with its own
 * volume that ramps toward its target one step per frame (no zipper noise on
 * volume changes), mute, and a master gain; finished voices free themselves. */
#define PREFIX_VOICES VOICES
#define PREFIX_RAMP_STEP RAMP_STEP
#define PREFIX_UNITY 256u

typedef struct {
    const int16_t *samples;
    size_t length;
    size_t position;
    uint16_t volume;
    uint16_t target;
    int muted;
    int active;
} prefix_voice;

typedef struct {
    prefix_voice voices[PREFIX_VOICES];
    uint16_t master;
} prefix_t;

void prefix_init(prefix_t *m)
{
    memset(m, 0, sizeof *m);
    m->master = PREFIX_UNITY;
}

int prefix_play(prefix_t *m, const int16_t *samples, size_t length, uint16_t volume)
{
    size_t i;
    for (i = 0; i < PREFIX_VOICES; i++) {
        prefix_voice *v = &m->voices[i];
        if (!v->active) {
            v->samples = samples;
            v->length = length;
            v->position = 0;
            v->volume = volume;
            v->target = volume;
            v->muted = 0;
            v->active = length > 0u;
            return (int)i;
        }
    }
    return -1;
}

void prefix_set_volume(prefix_t *m, int voice, uint16_t target)
{
    if (voice >= 0 && (size_t)voice < PREFIX_VOICES) {
        m->voices[voice].target = target;
    }
}

static int16_t prefix_clip(int32_t v)
{
    return v > INT16_MAX ? INT16_MAX : (v < INT16_MIN ? INT16_MIN : (int16_t)v);
}

/* Mixes `frames` frames into out and returns how many voices are still playing. */
size_t prefix_render(prefix_t *m, int16_t *out, size_t frames)
{
    size_t f;
    size_t i;
    size_t playing = 0;
    for (f = 0; f < frames; f++) {
        int32_t acc = 0;
        for (i = 0; i < PREFIX_VOICES; i++) {
            prefix_voice *v = &m->voices[i];
            if (!v->active) {
                continue;
            }
            if (v->volume < v->target) {
                unsigned gap = (unsigned)(v->target - v->volume);
                v->volume = (uint16_t)(gap < PREFIX_RAMP_STEP ? v->target : v->volume + PREFIX_RAMP_STEP);
            } else if (v->volume > v->target) {
                unsigned gap = (unsigned)(v->volume - v->target);
                v->volume = (uint16_t)(gap < PREFIX_RAMP_STEP ? v->target : v->volume - PREFIX_RAMP_STEP);
            }
            if (!v->muted) {
                acc += (int32_t)v->samples[v->position] * (int32_t)v->volume / (int32_t)PREFIX_UNITY;
            }
            if (++v->position == v->length) {
                v->active = 0;
            }
        }
        out[f] = prefix_clip(acc * (int32_t)m->master / (int32_t)PREFIX_UNITY);
    }
    for (i = 0; i < PREFIX_VOICES; i++) {
        playing += m->voices[i].active ? 1u : 0u;
    }
    return playing;
}

int prefix_selftest(void)
{
    static prefix_t m;
    static int16_t loud[8];
    static int16_t quiet[4];
    int16_t out[8];
    int a;
    int b;
    size_t i;

    for (i = 0; i < 8; i++) {
        loud[i] = 20000;
    }
    for (i = 0; i < 4; i++) {
        quiet[i] = 1000;
    }
    prefix_init(&m);
    a = prefix_play(&m, loud, 8, PREFIX_UNITY);
    b = prefix_play(&m, quiet, 4, PREFIX_UNITY);
    if (a < 0 || b < 0 || a == b) {
        return 1;
    }
    if (prefix_render(&m, out, 2) != 2u || out[0] != 21000) {
        return 2;
    }
    m.voices[a].muted = 1;
    if (prefix_render(&m, out, 2) != 1u || out[0] != 1000) {
        return 3;
    }
    m.voices[a].muted = 0;
    prefix_set_volume(&m, a, 0);
    prefix_render(&m, out, 4);
    if (m.voices[a].active || m.voices[a].volume >= PREFIX_UNITY) {
        return 4;
    }
    m.master = 2u * PREFIX_UNITY;
    a = prefix_play(&m, loud, 8, PREFIX_UNITY);
    prefix_render(&m, out, 1);
    return out[0] == INT16_MAX ? 0 : 5;
}
