/* Template for the window-manager module: a damage-rectangle tracker.
 * Rendered by trainer_service/simulation/codegen.py; the defaults above the body marker
 * only let this file compile on its own. */
#include <stddef.h>

#ifndef MAX_RECTS
#define MAX_RECTS 4u
#endif
/* ---- template body ---- */
/* Tracks which parts of the screen must be repainted. Rectangles are
 * half-open and kept pairwise non-touching, so the total damaged area is the
 * plain sum; when the table fills up everything collapses into one bounding
 * box (repainting a bit more beats dropping damage). */
#define PREFIX_MAX_RECTS MAX_RECTS

typedef struct {
    int x0;
    int y0;
    int x1;
    int y1;
} prefix_rect;

typedef struct {
    prefix_rect rects[PREFIX_MAX_RECTS];
    size_t count;
    int width;
    int height;
} prefix_t;

int prefix_rect_empty(prefix_rect r)
{
    return r.x0 >= r.x1 || r.y0 >= r.y1;
}

int prefix_rect_touches(prefix_rect a, prefix_rect b)
{
    return a.x0 <= b.x1 && b.x0 <= a.x1 && a.y0 <= b.y1 && b.y0 <= a.y1;
}

prefix_rect prefix_rect_union(prefix_rect a, prefix_rect b)
{
    prefix_rect u;
    u.x0 = a.x0 < b.x0 ? a.x0 : b.x0;
    u.y0 = a.y0 < b.y0 ? a.y0 : b.y0;
    u.x1 = a.x1 > b.x1 ? a.x1 : b.x1;
    u.y1 = a.y1 > b.y1 ? a.y1 : b.y1;
    return u;
}

void prefix_init(prefix_t *t, int width, int height)
{
    t->count = 0;
    t->width = width;
    t->height = height;
}

void prefix_add(prefix_t *t, prefix_rect r)
{
    size_t i = 0;
    r.x0 = r.x0 < 0 ? 0 : r.x0;
    r.y0 = r.y0 < 0 ? 0 : r.y0;
    r.x1 = r.x1 > t->width ? t->width : r.x1;
    r.y1 = r.y1 > t->height ? t->height : r.y1;
    if (prefix_rect_empty(r)) {
        return;
    }
    /* Each merge removes a stored rect, so this ends after at most count restarts. */
    while (i < t->count) {
        if (prefix_rect_touches(t->rects[i], r)) {
            r = prefix_rect_union(t->rects[i], r);
            t->rects[i] = t->rects[t->count - 1];
            t->count--;
            i = 0;
        } else {
            i++;
        }
    }
    if (t->count == PREFIX_MAX_RECTS) {
        for (i = 0; i < t->count; i++) {
            r = prefix_rect_union(t->rects[i], r);
        }
        t->count = 0;
    }
    t->rects[t->count++] = r;
}

long prefix_area(const prefix_t *t)
{
    long total = 0;
    size_t i;
    for (i = 0; i < t->count; i++) {
        total += (long)(t->rects[i].x1 - t->rects[i].x0) * (long)(t->rects[i].y1 - t->rects[i].y0);
    }
    return total;
}

int prefix_selftest(void)
{
    static prefix_t t;
    prefix_rect r;
    int k;

    prefix_init(&t, 100, 100);
    r.x0 = 0; r.y0 = 0; r.x1 = 10; r.y1 = 10;
    prefix_add(&t, r);
    r.x0 = 5; r.y0 = 5; r.x1 = 20; r.y1 = 20;
    prefix_add(&t, r);
    if (t.count != 1u || prefix_area(&t) != 400) {
        return 1;
    }
    r.x0 = 50; r.y0 = 50; r.x1 = 60; r.y1 = 60;
    prefix_add(&t, r);
    r.x0 = -10; r.y0 = -10; r.x1 = 5; r.y1 = 5;
    prefix_add(&t, r);
    r.x0 = 200; r.y0 = 200; r.x1 = 300; r.y1 = 300;
    prefix_add(&t, r);
    if (t.count != 2u || prefix_area(&t) != 500) {
        return 2;
    }
    prefix_init(&t, 100, 100);
    for (k = 0; k < (int)PREFIX_MAX_RECTS; k++) {
        r.x0 = k * 3; r.y0 = 90; r.x1 = k * 3 + 1; r.y1 = 91;
        prefix_add(&t, r);
    }
    if (t.count != PREFIX_MAX_RECTS) {
        return 3;
    }
    r.x0 = 0; r.y0 = 0; r.x1 = 1; r.y1 = 1;
    prefix_add(&t, r);
    if (t.count != 1u || t.rects[0].y0 != 0 || t.rects[0].y1 != 91) {
        return 4;
    }
    return 0;
}
