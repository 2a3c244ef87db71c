/* ratelimit: shared request limits in Redis with a local fallback; see ratelimit.c. */
#ifndef PAYMENTD_API_RATELIMIT_H
#define PAYMENTD_API_RATELIMIT_H

struct api;
struct api_req;
struct ratelimit;

enum rl_class { RL_WRITE, RL_READ, RL_CALLBACK };

/* retry_after_s: 0 when the request may go on, else the seconds to wait. */
typedef void (*ratelimit_cb)(struct api_req *r, int retry_after_s);

struct ratelimit *ratelimit_new(struct api *api);
void ratelimit_free(struct ratelimit *rl);
/* Counts r against its class's limit (per account for writes and reads,
 * per client IP for callbacks), and refuses it while its IP is blocked for
 * failed authentications. */
void ratelimit_check(struct api_req *r, enum rl_class cls, ratelimit_cb cb);
/* Counts a failed authentication from r's client IP; retry_after_s > 0
 * when that IP is now past the limit. */
void ratelimit_auth_failed(struct api_req *r, ratelimit_cb cb);

#endif
