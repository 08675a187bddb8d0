#include <stdint.h>
#include <string.h>

struct rect { uint16_t x, y, w, h; };

/* Pack a dirty rectangle of a framebuffer into a packet: 8-byte big-endian header, then rows. */
size_t pack_dirty_rect(uint8_t *out, const uint32_t *fb, size_t stride, struct rect r) {
    const uint16_t header[4] = { r.x, r.y, r.w, r.h };
    uint8_t *p = out;
    for (int i = 0; i < 4; i++) { *p++ = (uint8_t)(header[i] >> 8); *p++ = (uint8_t)header[i]; }
    for (uint16_t row = 0; row < r.h; row++, p += (size_t)r.w * 4)
        memcpy(p, fb + (size_t)(r.y + row) * stride + r.x, (size_t)r.w * 4);
    return (size_t)(p - out);
}
