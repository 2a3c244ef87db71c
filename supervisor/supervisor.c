/*
 * supervisor - the parent of every role process.
 *
 * Offers supervisor_run() and the child operations the control socket uses
 * (supervisor_stop_child(), _start_child(), _restart_child(), _drain()).
 * It reads and validates the configuration, creates the shared-memory
 * segment, forks api x API_PROCESSES, worker x WORKERS, one outbox and one
 * exporter (each an exec of this binary with --role), and then only
 * watches, on one libevent loop:
 *   - a child that exits unasked is restarted after a back-off (backoff.c);
 *     too many crashes within RESTART_PERIOD mark it failed and leave it
 *     down; exit code 2 (bad configuration) is never respawned;
 *   - a child whose heartbeat in shared memory is older than
 *     ROLE_HANG_TIMEOUT is killed and counts as a crash;
 *   - SIGTERM stops the api processes first (they finish their requests),
 *     then the rest, then exits 0; SIGHUP re-reads the configuration and,
 *     when valid, restarts the roles one at a time onto it;
 *   - systemd hears READY=1 once every role is ready, WATCHDOG=1 from the
 *     loop's own tick, STATUS= with a role summary, STOPPING=1.
 * Signal handlers do no work: libevent delivers them as loop callbacks.
 * It never touches the database or a gateway. Calls common/, backoff,
 * control, libsystemd.
 */
#include "supervisor.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "log.h"
#include "role.h"
#include "xmalloc.h"

extern char **environ;

#define TICK_MS 250

static void supervisor_spawn(struct supervisor *s, struct child *c);

/* The one supervisor of this process, for timer callbacks that get a child. */
static struct supervisor *supervisor_self;

int64_t
supervisor_uptime_s(const struct child *c)
{
    if (c->pid <= 0)
        return 0;
    return (shm_mono_ms() - c->started_mono) / 1000;
}

static struct shm_slot *
child_slot(struct supervisor *s, struct child *c)
{
    return &s->seg->slots[c->slot];
}

static void
child_set_state(struct supervisor *s, struct child *c, enum slot_state st)
{
    c->state = st;
    atomic_store(&child_slot(s, c)->state, st);
}

static void
child_describe_exit(int status, char *buf, size_t cap)
{
    if (WIFEXITED(status))
        snprintf(buf, cap, "exit code %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, cap, "signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(buf, cap, "status %d", status);
}

/* ---- spawning ---- */

/* Builds the child's environment before fork: after fork in a process with
 * NNG threads only async-signal-safe calls are allowed. */
static char **
supervisor_child_env(struct supervisor *s, struct child *c)
{
    size_t n = 0, k = 0;
    while (environ[n])
        n++;
    char **envp = xcalloc(n + 3, sizeof(char *));
    for (size_t i = 0; i < n; i++) {
        if (strncmp(environ[i], "PAYMENTD_SLOT=", 14) == 0 ||
            strncmp(environ[i], "PAYMENTD_SUPERVISOR_PID=", 24) == 0 ||
            strncmp(environ[i], "NOTIFY_SOCKET=", 14) == 0 ||
            strncmp(environ[i], "WATCHDOG_", 9) == 0)
            continue;
        envp[k++] = xstrdup(environ[i]);
    }
    envp[k++] = xasprintf("PAYMENTD_SLOT=%d", c->slot);
    envp[k++] = xasprintf("PAYMENTD_SUPERVISOR_PID=%d", (int)getpid());
    envp[k] = NULL;
    (void)s;
    return envp;
}

static void
supervisor_free_env(char **envp)
{
    for (char **p = envp; *p; p++)
        free(*p);
    free(envp);
}

static void
supervisor_spawn(struct supervisor *s, struct child *c)
{
    struct shm_slot *slot = child_slot(s, c);
    char idx[16];
    char **envp = supervisor_child_env(s, c);
    pid_t parent = getpid();
    snprintf(idx, sizeof(idx), "%d", c->index);
    char *argv[] = {"paymentd", "--role", (char *)shm_role_name(c->role), "--index", idx, NULL};

    atomic_store(&slot->ready, 0);
    atomic_store(&slot->heartbeat_ms, shm_now_ms());
    pid_t pid = fork();
    if (pid < 0) {
        log_error("fork for %s/%d failed: %s", shm_role_name(c->role), c->index, strerror(errno));
        supervisor_free_env(envp);
        child_set_state(s, c, SLOT_BACKOFF);
        struct timeval tv = {1, 0};
        evtimer_add(c->restart_timer, &tv);
        return;
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(0);
        execve(s->self_exe, argv, envp);
        _exit(127);
    }
    supervisor_free_env(envp);
    c->pid = pid;
    c->started_mono = shm_mono_ms();
    c->hung = false;
    c->kill_at_mono = 0;
    atomic_store(&slot->pid, pid);
    atomic_store(&slot->started_ms, shm_now_ms());
    child_set_state(s, c, SLOT_STARTING);
    log_info("started %s/%d as pid %d", shm_role_name(c->role), c->index, (int)pid);
}

static void
supervisor_respawn(struct supervisor *s, struct child *c)
{
    atomic_fetch_add(&child_slot(s, c)->restarts, 1);
    supervisor_spawn(s, c);
}

static void
supervisor_on_restart_timer(evutil_socket_t fd, short what, void *arg)
{
    struct child *c = arg;
    (void)fd;
    (void)what;
    if (supervisor_self->phase != RUNNING || c->state != SLOT_BACKOFF)
        return;
    supervisor_respawn(supervisor_self, c);
}

/* ---- operator actions ---- */

static void
supervisor_term(struct supervisor *s, struct child *c)
{
    if (c->pid <= 0)
        return;
    kill(c->pid, SIGTERM);
    c->kill_at_mono = shm_mono_ms() + s->cfg.shutdown_timeout_ms + 2000;
    child_set_state(s, c, SLOT_STOPPING);
}

void
supervisor_stop_child(struct supervisor *s, struct child *c)
{
    evtimer_del(c->restart_timer);
    c->reload_pending = false;
    if (c->pid > 0) {
        c->stop_requested = true;
        c->restart_requested = false;
        supervisor_term(s, c);
    } else {
        child_set_state(s, c, SLOT_STOPPED);
    }
}

void
supervisor_start_child(struct supervisor *s, struct child *c)
{
    if (c->pid > 0) {
        c->stop_requested = false; /* a start during a stop cancels the stop */
        return;
    }
    evtimer_del(c->restart_timer);
    backoff_init(&c->backoff);
    if (c->role == ROLE_API && s->draining) {
        s->draining = false;
        atomic_store(&s->seg->draining, 0);
    }
    supervisor_respawn(s, c);
}

void
supervisor_restart_child(struct supervisor *s, struct child *c)
{
    if (c->pid > 0) {
        c->stop_requested = false;
        c->restart_requested = true;
        supervisor_term(s, c);
        return;
    }
    supervisor_start_child(s, c);
}

void
supervisor_drain(struct supervisor *s)
{
    s->draining = true;
    atomic_store(&s->seg->draining, 1);
    for (int i = 0; i < s->nchildren; i++) {
        if (s->children[i].role == ROLE_API)
            supervisor_stop_child(s, &s->children[i]);
    }
    log_info("draining: api processes finish their requests and stay stopped");
}

/* ---- child exits ---- */

static void supervisor_shutdown_progress(struct supervisor *s);

static void
supervisor_child_exited(struct supervisor *s, struct child *c, int status)
{
    struct shm_slot *slot = child_slot(s, c);
    char how[96];
    int64_t uptime = shm_mono_ms() - c->started_mono;
    int32_t code =
        WIFEXITED(status) ? WEXITSTATUS(status) : (WIFSIGNALED(status) ? -WTERMSIG(status) : -1);

    child_describe_exit(status, how, sizeof(how));
    c->pid = 0;
    c->kill_at_mono = 0;
    atomic_store(&slot->pid, 0);
    atomic_store(&slot->ready, 0);
    atomic_store(&slot->last_exit, code);

    if (s->phase != RUNNING) {
        log_info("%s/%d stopped (%s)", shm_role_name(c->role), c->index, how);
        child_set_state(s, c, SLOT_STOPPED);
        supervisor_shutdown_progress(s);
        return;
    }
    if (c->stop_requested) {
        c->stop_requested = false;
        log_info("%s/%d stopped on request (%s)", shm_role_name(c->role), c->index, how);
        child_set_state(s, c, SLOT_STOPPED);
        return;
    }
    if (c->restart_requested) {
        c->restart_requested = false;
        log_info("%s/%d stopped for a restart (%s)", shm_role_name(c->role), c->index, how);
        supervisor_respawn(s, c);
        return;
    }
    if (WIFEXITED(status) && WEXITSTATUS(status) == EXIT_ROLE_CONFIG) {
        log_error("%s/%d exited with code 2 (bad configuration or environment): not restarted; "
                  "fix the cause and run paymentctl start %s",
                  shm_role_name(c->role), c->index, shm_role_name(c->role));
        child_set_state(s, c, SLOT_FAILED);
        return;
    }
    int64_t delay = 0;
    if (backoff_crash(&c->backoff, shm_mono_ms(), uptime, s->cfg.restart_intensity,
                      s->cfg.restart_period_ms, &delay)) {
        log_error("%s/%d %s (%s); it crashed more than %d times within %lld ms: marked failed "
                  "and left down",
                  shm_role_name(c->role), c->index, c->hung ? "hung" : "died", how,
                  s->cfg.restart_intensity, (long long)s->cfg.restart_period_ms);
        child_set_state(s, c, SLOT_FAILED);
        return;
    }
    log_warn("%s/%d %s (%s) after %lld ms; restarting in %lld ms", shm_role_name(c->role), c->index,
             c->hung ? "hung" : "died", how, (long long)uptime, (long long)delay);
    child_set_state(s, c, SLOT_BACKOFF);
    struct timeval tv = {(time_t)(delay / 1000), (suseconds_t)((delay % 1000) * 1000)};
    evtimer_add(c->restart_timer, &tv);
}

static struct child *
supervisor_find_pid(struct supervisor *s, pid_t pid)
{
    for (int i = 0; i < s->nchildren; i++) {
        if (s->children[i].pid == pid)
            return &s->children[i];
    }
    return NULL;
}

static void
supervisor_reap(struct supervisor *s)
{
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        struct child *c = supervisor_find_pid(s, pid);
        if (c)
            supervisor_child_exited(s, c, status);
    }
}

/* ---- shutdown ---- */

static bool
supervisor_any_alive(struct supervisor *s, bool api_only)
{
    for (int i = 0; i < s->nchildren; i++) {
        struct child *c = &s->children[i];
        if (c->pid > 0 && (!api_only || c->role == ROLE_API))
            return true;
    }
    return false;
}

static void
supervisor_term_all(struct supervisor *s, bool api)
{
    for (int i = 0; i < s->nchildren; i++) {
        struct child *c = &s->children[i];
        evtimer_del(c->restart_timer);
        if ((c->role == ROLE_API) == api)
            supervisor_term(s, c);
    }
}

static void
supervisor_shutdown_progress(struct supervisor *s)
{
    if (s->phase == STOPPING_API && !supervisor_any_alive(s, true)) {
        s->phase = STOPPING_REST;
        log_info("api processes stopped; stopping the other roles");
        supervisor_term_all(s, false);
    }
    if (s->phase == STOPPING_REST && !supervisor_any_alive(s, false)) {
        s->phase = STOPPED;
        log_info("every role stopped");
        event_base_loopexit(s->base, NULL);
    }
}

static void
supervisor_begin_shutdown(struct supervisor *s)
{
    if (s->phase != RUNNING)
        return;
    sd_notify(0, "STOPPING=1\nSTATUS=stopping");
    log_info("shutting down: stopping api processes first");
    s->phase = STOPPING_API;
    supervisor_term_all(s, true);
    supervisor_shutdown_progress(s);
}

/* ---- configuration reload ---- */

static void
supervisor_reload(struct supervisor *s)
{
    struct config next;
    char err[512];

    if (config_load(&next, s->config_path, err, sizeof(err)) < 0) {
        log_error("reload refused, the running configuration stays: %s", err);
        return;
    }
    for (int k = 0; k < CFG__COUNT; k++) {
        const char *a = s->cfg.raw[k], *b = next.raw[k];
        if (!config_key_needs_restart((enum config_key)k))
            continue;
        if ((a == NULL) != (b == NULL) || (a && strcmp(a, b) != 0)) {
            log_warn("%s changed: it takes effect at the next start of the service, not on "
                     "reload",
                     config_key_name((enum config_key)k));
            if (config_set(&next, config_key_name((enum config_key)k), a, err, sizeof(err)) < 0) {
                log_error("reload refused: %s", err);
                config_free(&next);
                return;
            }
        }
    }
    config_free(&s->cfg);
    s->cfg = next;
    config_export(&s->cfg);
    log_set_level(s->cfg.log_level);
    for (int i = 0; i < s->nchildren; i++)
        s->children[i].reload_pending = true;
    s->reloading = NULL;
    log_info("configuration reloaded; restarting the roles one at a time");
}

/* Restarts roles one by one onto a new configuration: the next one goes
 * only when the previous one is running again, so intake never stops. */
static void
supervisor_reload_step(struct supervisor *s)
{
    if (s->reloading) {
        if (s->reloading->state == SLOT_STARTING || s->reloading->state == SLOT_STOPPING)
            return;
        s->reloading = NULL;
    }
    for (int i = 0; i < s->nchildren; i++) {
        struct child *c = &s->children[i];
        if (!c->reload_pending)
            continue;
        c->reload_pending = false;
        if (c->state != SLOT_RUNNING)
            continue; /* picks up the configuration at its next start */
        s->reloading = c;
        c->restart_requested = true;
        supervisor_term(s, c);
        return;
    }
}

/* ---- the tick: readiness, hangs, kill deadlines, systemd ---- */

static void
supervisor_status(struct supervisor *s, char *buf, size_t cap)
{
    int total[ROLE__COUNT] = {0}, up[ROLE__COUNT] = {0}, failed = 0;
    size_t n = 0;
    for (int i = 0; i < s->nchildren; i++) {
        struct child *c = &s->children[i];
        total[c->role]++;
        up[c->role] += c->state == SLOT_RUNNING;
        failed += c->state == SLOT_FAILED;
    }
    for (int r = ROLE_API; r < ROLE__COUNT; r++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%s %d/%d", n ? ", " : "",
                              shm_role_name((enum role_kind)r), up[r], total[r]);
    snprintf(buf + n, cap - n, " running; %d failed%s", failed, s->draining ? "; draining" : "");
}

static void
supervisor_on_tick(evutil_socket_t fd, short what, void *arg)
{
    struct supervisor *s = arg;
    int64_t now = shm_mono_ms(), wall = shm_now_ms();
    bool all_ready = true;
    (void)fd;
    (void)what;

    atomic_store(&s->slot->heartbeat_ms, wall);
    supervisor_reap(s); /* in case a SIGCHLD was coalesced */
    for (int i = 0; i < s->nchildren; i++) {
        struct child *c = &s->children[i];
        struct shm_slot *slot = child_slot(s, c);
        if (c->pid > 0 && c->state == SLOT_STARTING && atomic_load(&slot->ready) == 1) {
            child_set_state(s, c, SLOT_RUNNING);
            log_info("%s/%d is ready", shm_role_name(c->role), c->index);
        }
        if (c->pid > 0 && !c->hung &&
            (c->state == SLOT_STARTING || c->state == SLOT_RUNNING || c->state == SLOT_STOPPING) &&
            wall - atomic_load(&slot->heartbeat_ms) > s->cfg.role_hang_timeout_ms) {
            log_error("%s/%d (pid %d) sent no heartbeat for %lld ms: killing it",
                      shm_role_name(c->role), c->index, (int)c->pid,
                      (long long)(wall - atomic_load(&slot->heartbeat_ms)));
            c->hung = true;
            kill(c->pid, SIGKILL);
        }
        if (c->pid > 0 && c->kill_at_mono && now > c->kill_at_mono) {
            log_warn("%s/%d did not stop in time: killing it", shm_role_name(c->role), c->index);
            c->kill_at_mono = 0;
            kill(c->pid, SIGKILL);
        }
        if (c->state != SLOT_RUNNING)
            all_ready = false;
    }
    if (s->phase != RUNNING)
        return;
    supervisor_reload_step(s);
    if (!s->ready_sent && all_ready) {
        s->ready_sent = true;
        log_info("every role is ready");
        sd_notify(0, "READY=1");
    }
    char status[256];
    supervisor_status(s, status, sizeof(status));
    if (strcmp(status, s->status_line) != 0) {
        snprintf(s->status_line, sizeof(s->status_line), "%s", status);
        sd_notifyf(0, "STATUS=%s", status);
    }
    if (s->watchdog_usec && (now - s->last_watchdog_mono) * 1000 >= (int64_t)s->watchdog_usec / 2) {
        s->last_watchdog_mono = now;
        sd_notify(0, "WATCHDOG=1");
    }
}

static void
supervisor_on_signal(evutil_socket_t sig, short what, void *arg)
{
    struct supervisor *s = arg;
    (void)what;
    switch (sig) {
    case SIGCHLD:
        supervisor_reap(s);
        break;
    case SIGHUP:
        supervisor_reload(s);
        break;
    case SIGTERM:
    case SIGINT:
        if (s->phase != RUNNING) {
            log_warn("second stop signal: killing every role now");
            for (int i = 0; i < s->nchildren; i++) {
                if (s->children[i].pid > 0)
                    kill(s->children[i].pid, SIGKILL);
            }
            break;
        }
        supervisor_begin_shutdown(s);
        break;
    default:
        break;
    }
}

/* ---- start-up ---- */

static void
supervisor_add(struct supervisor *s, enum role_kind role, int index)
{
    struct child *c = &s->children[s->nchildren++];
    memset(c, 0, sizeof(*c));
    c->role = role;
    c->index = index;
    c->slot = shm_slot_claim(s->seg, role, index);
    if (c->slot < 0)
        abort(); /* the segment is sized for the configured maximum */
    backoff_init(&c->backoff);
    c->restart_timer = evtimer_new(s->base, supervisor_on_restart_timer, c);
}

static void
supervisor_mkdir(const char *path)
{
    char buf[256];
    snprintf(buf, sizeof(buf), "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(buf, 0755);
            *p = '/';
        }
    }
    if (mkdir(buf, 0750) < 0 && errno != EEXIST)
        log_fatal(EXIT_ROLE_CONFIG, "RUN_DIR %s cannot be created: %s", path, strerror(errno));
    if (access(buf, W_OK) < 0)
        log_fatal(EXIT_ROLE_CONFIG, "RUN_DIR %s is not writable: %s", path, strerror(errno));
}

int
supervisor_run(const char *config_path)
{
    static struct supervisor s;
    char err[512];
    ssize_t n;

    log_init("supervisor", 0);
    if (config_load(&s.cfg, config_path, err, sizeof(err)) < 0)
        log_fatal(EXIT_ROLE_CONFIG, "configuration: %s", err);
    log_set_level(s.cfg.log_level);
    s.config_path = config_path;
    supervisor_self = &s;
    n = readlink("/proc/self/exe", s.self_exe, sizeof(s.self_exe) - 1);
    if (n <= 0)
        log_fatal(EXIT_ROLE_CONFIG, "cannot find this program's path: %s", strerror(errno));
    s.self_exe[n] = '\0';
    supervisor_mkdir(s.cfg.run_dir);
    s.seg = shm_create(s.cfg.instance, err, sizeof(err));
    if (!s.seg)
        log_fatal(EXIT_ROLE_CONFIG, "%s", err);
    for (int i = 0; i < s.cfg.n_providers && i < SHM_MAX_BREAKERS; i++)
        snprintf(s.seg->breakers[i].provider, sizeof(s.seg->breakers[i].provider), "%s",
                 s.cfg.providers[i].name);
    s.slot = &s.seg->slots[shm_slot_claim(s.seg, ROLE_SUPERVISOR, 0)];
    atomic_store(&s.slot->pid, getpid());
    atomic_store(&s.slot->started_ms, shm_now_ms());
    atomic_store(&s.slot->state, SLOT_RUNNING);
    atomic_store(&s.slot->ready, 1);
    config_export(&s.cfg);

    s.base = event_base_new();
    if (!s.base)
        log_fatal(EXIT_ROLE_FAILURE, "cannot create an event loop");
    s.nngev = nngev_new(s.base);
    s.started_mono = shm_mono_ms();
    if (control_start(&s) < 0)
        log_fatal(EXIT_ROLE_CONFIG, "cannot open the control socket in %s", s.cfg.run_dir);

    s.sig_term = evsignal_new(s.base, SIGTERM, supervisor_on_signal, &s);
    s.sig_int = evsignal_new(s.base, SIGINT, supervisor_on_signal, &s);
    s.sig_hup = evsignal_new(s.base, SIGHUP, supervisor_on_signal, &s);
    s.sig_chld = evsignal_new(s.base, SIGCHLD, supervisor_on_signal, &s);
    s.sig_pipe = evsignal_new(s.base, SIGPIPE, supervisor_on_signal, &s);
    evsignal_add(s.sig_term, NULL);
    evsignal_add(s.sig_int, NULL);
    evsignal_add(s.sig_hup, NULL);
    evsignal_add(s.sig_chld, NULL);
    evsignal_add(s.sig_pipe, NULL);

    for (int i = 0; i < s.cfg.api_processes; i++)
        supervisor_add(&s, ROLE_API, i);
    for (int i = 0; i < s.cfg.workers; i++)
        supervisor_add(&s, ROLE_WORKER, i);
    supervisor_add(&s, ROLE_OUTBOX, 0);
    supervisor_add(&s, ROLE_EXPORTER, 0);
    log_info("starting %d api, %d worker, 1 outbox, 1 exporter processes (instance %s)",
             s.cfg.api_processes, s.cfg.workers, s.cfg.instance);
    /* Workers first, so that the api finds them when it starts. */
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < s.nchildren; i++) {
            if ((s.children[i].role == ROLE_API) == (pass == 1))
                supervisor_spawn(&s, &s.children[i]);
        }
    }
    if (sd_watchdog_enabled(0, &s.watchdog_usec) <= 0)
        s.watchdog_usec = 0;

    s.tick = event_new(s.base, -1, EV_PERSIST, supervisor_on_tick, &s);
    struct timeval tv = {0, TICK_MS * 1000};
    event_add(s.tick, &tv);
    event_base_dispatch(s.base);

    control_stop();
    nngev_free(s.nngev);
    for (int i = 0; i < s.nchildren; i++)
        event_free(s.children[i].restart_timer);
    event_free(s.tick);
    event_free(s.sig_term);
    event_free(s.sig_int);
    event_free(s.sig_hup);
    event_free(s.sig_chld);
    event_free(s.sig_pipe);
    event_base_free(s.base);
    shm_detach(s.seg);
    shm_remove(s.cfg.instance);
    log_info("supervisor exiting");
    config_free(&s.cfg);
    return 0;
}
