/* Template for the graphics module: ARGB8888 blend and clipped blit.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>
#include <stdint.h>

#ifndef WIDTH
#define WIDTH 16
#endif
#ifndef HEIGHT
#define HEIGHT 12
#endif
#ifndef SOURCE_COLOR
#define SOURCE_COLOR 0x80FFFFFFu
#endif
#ifndef FILL_FN
#define FILL_FN prefix_fill
#endif
/* ---- template body ---- */
/* Software compositor primitives on ARGB8888 surfaces: a source-over blend in
 * integer arithmetic (rounded, so opaque and transparent sources are exact) and
 * a clipped blit that blends a surface onto another. */
typedef struct {
    uint32_t *pixels;
    int width;
    int height;
    int stride; /* in pixels */
} prefix_surface;

uint32_t prefix_blend(uint32_t dst, uint32_t src)
{
    uint32_t a = src >> 24;
    uint32_t inv = 255u - a;
    uint32_t r = (((src >> 16) & 0xFFu) * a + ((dst >> 16) & 0xFFu) * inv + 127u) / 255u;
    uint32_t g = (((src >> 8) & 0xFFu) * a + ((dst >> 8) & 0xFFu) * inv + 127u) / 255u;
    uint32_t b = ((src & 0xFFu) * a + (dst & 0xFFu) * inv + 127u) / 255u;
    uint32_t out_a = a + ((dst >> 24) * inv + 127u) / 255u;
    return (out_a << 24) | (r << 16) | (g << 8) | b;
}

void FILL_FN(prefix_surface *s, uint32_t color)
{
    int x;
    int y;
    for (y = 0; y < s->height; y++) {
        uint32_t *row = s->pixels + (size_t)y * (size_t)s->stride;
        for (x = 0; x < s->width; x++) {
            row[x] = color;
        }
    }
}

void prefix_blit(prefix_surface *dst, const prefix_surface *src, int dx, int dy)
{
    int sx0 = 0;
    int sy0 = 0;
    int w = src->width;
    int h = src->height;
    int x;
    int y;
    if (dx < 0) {
        sx0 = -dx;
        w += dx;
        dx = 0;
    }
    if (dy < 0) {
        sy0 = -dy;
        h += dy;
        dy = 0;
    }
    if (dx + w > dst->width) {
        w = dst->width - dx;
    }
    if (dy + h > dst->height) {
        h = dst->height - dy;
    }
    if (w <= 0 || h <= 0) {
        return;
    }
    for (y = 0; y < h; y++) {
        uint32_t *drow = dst->pixels + (size_t)(dy + y) * (size_t)dst->stride + (size_t)dx;
        const uint32_t *srow = src->pixels + (size_t)(sy0 + y) * (size_t)src->stride + (size_t)sx0;
        for (x = 0; x < w; x++) {
            drow[x] = prefix_blend(drow[x], srow[x]);
        }
    }
}

int prefix_selftest(void)
{
    static uint32_t fb[HEIGHT][WIDTH];
    static uint32_t sprite[4][4];
    prefix_surface dst;
    prefix_surface src;
    uint32_t expect;

    dst.pixels = &fb[0][0];
    dst.width = WIDTH;
    dst.height = HEIGHT;
    dst.stride = WIDTH;
    src.pixels = &sprite[0][0];
    src.width = 4;
    src.height = 4;
    src.stride = 4;

    if (prefix_blend(0xFF102030u, 0xFF123456u) != 0xFF123456u || prefix_blend(0xFF102030u, 0x00ABCDEFu) != 0xFF102030u) {
        return 1;
    }
    FILL_FN(&dst, 0xFF000000u);
    FILL_FN(&src, SOURCE_COLOR);
    prefix_blit(&dst, &src, -2, -2);
    expect = prefix_blend(0xFF000000u, SOURCE_COLOR);
    if (fb[0][0] != expect || fb[1][1] != expect || fb[2][2] != 0xFF000000u) {
        return 2;
    }
    prefix_blit(&dst, &src, WIDTH - 1, HEIGHT - 1);
    if (fb[HEIGHT - 1][WIDTH - 1] != expect || fb[HEIGHT - 2][WIDTH - 2] != 0xFF000000u) {
        return 3;
    }
    prefix_blit(&dst, &src, WIDTH, 0);
    prefix_blit(&dst, &src, -4, 0);
    if (fb[0][WIDTH - 1] != 0xFF000000u) {
        return 4;
    }
    return 0;
}
