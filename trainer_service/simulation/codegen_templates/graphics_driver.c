/* Template for the graphics_driver feature: a double-buffered display driver.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stdint.h>
#include <string.h>

#ifndef WIDTH
#define WIDTH 64
#endif
#ifndef HEIGHT
#define HEIGHT 48
#endif
#ifndef COLOR
#define COLOR 0xFF336699u
#endif
/* ---- template body ---- */
/* A minimal display driver: two scanout buffers, drawing always goes to the
 * back buffer, and a requested page flip only happens at vertical blank so
 * the screen never shows a half-drawn frame. */
#define PREFIX_WIDTH WIDTH
#define PREFIX_HEIGHT HEIGHT

typedef struct {
    uint32_t buffers[2][PREFIX_WIDTH * PREFIX_HEIGHT];
    int front;
    int flip_pending;
    unsigned long flips;
    unsigned long vblanks;
} prefix_device;

void prefix_init(prefix_device *dev)
{
    memset(dev, 0, sizeof *dev);
}

uint32_t *prefix_back_buffer(prefix_device *dev)
{
    return dev->buffers[1 - dev->front];
}

uint32_t prefix_scanout_pixel(const prefix_device *dev, int x, int y)
{
    if (x < 0 || y < 0 || x >= PREFIX_WIDTH || y >= PREFIX_HEIGHT) {
        return 0;
    }
    return dev->buffers[dev->front][y * PREFIX_WIDTH + x];
}

void prefix_fill_rect(prefix_device *dev, int x, int y, int w, int h, uint32_t color)
{
    uint32_t *back = prefix_back_buffer(dev);
    int x1 = x + w;
    int y1 = y + h;
    int i;
    int j;
    x = x < 0 ? 0 : x;
    y = y < 0 ? 0 : y;
    x1 = x1 > PREFIX_WIDTH ? PREFIX_WIDTH : x1;
    y1 = y1 > PREFIX_HEIGHT ? PREFIX_HEIGHT : y1;
    for (j = y; j < y1; j++) {
        for (i = x; i < x1; i++) {
            back[j * PREFIX_WIDTH + i] = color;
        }
    }
}

int prefix_request_flip(prefix_device *dev)
{
    if (dev->flip_pending) {
        return -1;
    }
    dev->flip_pending = 1;
    return 0;
}

void prefix_vblank(prefix_device *dev)
{
    dev->vblanks++;
    if (dev->flip_pending) {
        dev->front = 1 - dev->front;
        dev->flip_pending = 0;
        dev->flips++;
    }
}

int prefix_selftest(void)
{
    static prefix_device dev;

    prefix_init(&dev);
    prefix_fill_rect(&dev, -5, -5, 10, 10, COLOR);
    if (prefix_scanout_pixel(&dev, 0, 0) != 0u) {
        return 1;
    }
    if (prefix_request_flip(&dev) != 0 || prefix_request_flip(&dev) != -1) {
        return 2;
    }
    prefix_vblank(&dev);
    if (prefix_scanout_pixel(&dev, 0, 0) != COLOR || prefix_scanout_pixel(&dev, 5, 5) != 0u) {
        return 3;
    }
    prefix_fill_rect(&dev, PREFIX_WIDTH - 2, PREFIX_HEIGHT - 2, 10, 10, 0xFFFFFFFFu);
    prefix_vblank(&dev);
    if (dev.flips != 1u || dev.vblanks != 2u || prefix_scanout_pixel(&dev, PREFIX_WIDTH - 1, PREFIX_HEIGHT - 1) != 0u) {
        return 4;
    }
    return prefix_scanout_pixel(&dev, PREFIX_WIDTH, 0) == 0u ? 0 : 5;
}
