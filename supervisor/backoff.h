/* backoff: restart delays and the restart-intensity window; see backoff.c. */
#ifndef PAYMENTD_BACKOFF_H
#define PAYMENTD_BACKOFF_H

#include <stdbool.h>
#include <stdint.h>

#define BACKOFF_MIN_MS           1000
#define BACKOFF_MAX_MS           60000
#define BACKOFF_STABLE_UPTIME_MS 60000
#define BACKOFF_HISTORY          1024

struct backoff {
    int64_t next_ms;
    int64_t crashes[BACKOFF_HISTORY]; /* ring of crash times */
    unsigned head, count;
};

void backoff_init(struct backoff *b);

/* Records a crash at now_ms of a process that had been up for uptime_ms.
 * Returns true when the role crashed more than intensity times within
 * period_ms and must be left down; otherwise sets *delay_ms to wait before
 * the restart. */
bool backoff_crash(struct backoff *b, int64_t now_ms, int64_t uptime_ms, int intensity,
                   int64_t period_ms, int64_t *delay_ms);

#endif
