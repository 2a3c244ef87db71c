/* supervisor: the process that forks and watches the roles; see supervisor.c. */
#ifndef PAYMENTD_SUPERVISOR_H
#define PAYMENTD_SUPERVISOR_H

#include <event2/event.h>
#include <stdbool.h>
#include <sys/types.h>

#include "backoff.h"
#include "config.h"
#include "nngev.h"
#include "shm.h"

struct child {
    enum role_kind role;
    int index;
    int slot;
    pid_t pid;
    enum slot_state state;
    int64_t started_mono;
    struct backoff backoff;
    struct event *restart_timer;
    int64_t kill_at_mono;   /* SIGKILL deadline after a SIGTERM; 0: none */
    bool stop_requested;    /* operator stop or drain: stay down */
    bool restart_requested; /* operator restart or reload: respawn at once */
    bool reload_pending;    /* waiting for its turn in a rolling reload */
    bool hung;
};

enum shutdown_phase { RUNNING, STOPPING_API, STOPPING_REST, STOPPED };

struct supervisor {
    struct config cfg;
    const char *config_path;
    char self_exe[4096];
    struct shm_segment *seg;
    struct shm_slot *slot;
    struct event_base *base;
    struct nngev *nngev;
    struct child children[SHM_MAX_SLOTS];
    int nchildren;
    enum shutdown_phase phase;
    bool ready_sent;
    bool draining;
    struct child *reloading;
    uint64_t watchdog_usec;
    int64_t last_watchdog_mono;
    char status_line[256];
    int64_t started_mono;
    struct event *tick, *sig_term, *sig_int, *sig_hup, *sig_chld, *sig_pipe;
};

int supervisor_run(const char *config_path);

/* Used by the control socket. */
void supervisor_stop_child(struct supervisor *s, struct child *c);
void supervisor_start_child(struct supervisor *s, struct child *c);
void supervisor_restart_child(struct supervisor *s, struct child *c);
void supervisor_drain(struct supervisor *s);
int64_t supervisor_uptime_s(const struct child *c);

/* control.c */
int control_start(struct supervisor *s);
void control_stop(void);

#endif
