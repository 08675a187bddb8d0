#include <stddef.h>
#include <stdint.h>

/* Composite premultiplied ARGB8888 pixels of src over dst, two channels per multiply. */
void blend_span(uint32_t *dst, const uint32_t *src, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t s = src[i], d = dst[i], inv = 255u - (s >> 24);
        uint32_t rb = (((d & 0x00ff00ffu) * inv) >> 8) & 0x00ff00ffu;
        uint32_t ag = (((d >> 8) & 0x00ff00ffu) * inv) & 0xff00ff00u;
        dst[i] = s + rb + ag;
    }
}
