/*
 * backoff - the supervisor's restart arithmetic, kept pure so that unit
 * tests can drive it with made-up clocks.
 *
 * Offers backoff_init() and backoff_crash(). The delay before a restart
 * starts at 1 s and doubles up to 60 s; a process that stayed up for 60 s
 * before crashing starts again from 1 s. Crash times are kept in a ring;
 * more than `intensity` crashes within `period` means the role is failing
 * for a reason a restart will not fix, and it is left down (Erlang/OTP's
 * restart intensity, as in supervisord's startretries). Calls nothing.
 */
#include "backoff.h"

#include <string.h>

void
backoff_init(struct backoff *b)
{
    memset(b, 0, sizeof(*b));
    b->next_ms = BACKOFF_MIN_MS;
}

bool
backoff_crash(struct backoff *b, int64_t now_ms, int64_t uptime_ms, int intensity,
              int64_t period_ms, int64_t *delay_ms)
{
    unsigned recent = 0;

    if (uptime_ms >= BACKOFF_STABLE_UPTIME_MS)
        b->next_ms = BACKOFF_MIN_MS;
    b->crashes[b->head] = now_ms;
    b->head = (b->head + 1) % BACKOFF_HISTORY;
    if (b->count < BACKOFF_HISTORY)
        b->count++;
    for (unsigned i = 0; i < b->count; i++) {
        unsigned at = (b->head + BACKOFF_HISTORY - 1 - i) % BACKOFF_HISTORY;
        if (now_ms - b->crashes[at] < period_ms)
            recent++;
    }
    if (intensity >= 0 && recent > (unsigned)intensity)
        return true;
    *delay_ms = b->next_ms;
    b->next_ms = b->next_ms * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : b->next_ms * 2;
    return false;
}
