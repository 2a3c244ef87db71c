/*
 * shm - the shared-memory segment every process of one instance maps.
 *
 * Offers shm_create() (supervisor), shm_attach() (roles), shm_slot_claim(),
 * shm_remove() and the name tables for roles and states. The segment is fixed-size and
 * laid out at creation; it holds only C11 atomics and constants, no lock, so
 * a process that dies at any instruction leaves nothing held. Its header
 * carries a magic number and SHM_LAYOUT_VERSION: a process built for another
 * layout refuses to attach with a clear error rather than misreading it.
 * Failures are returned as -1/NULL with a message in err. Calls libc only.
 */
#include "shm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

_Static_assert(ATOMIC_LLONG_LOCK_FREE == 2, "64-bit atomics must be lock-free in shared memory");
_Static_assert(ATOMIC_INT_LOCK_FREE == 2, "32-bit atomics must be lock-free in shared memory");

static const char *const shm_role_names[ROLE__COUNT] = {"supervisor", "api", "worker", "outbox",
                                                        "exporter"};
static const char *const shm_state_names[SLOT__COUNT] = {
    "empty", "starting", "running", "stopping", "stopped", "backoff", "failed"};

const char *
shm_role_name(enum role_kind role)
{
    return (unsigned)role < ROLE__COUNT ? shm_role_names[role] : "unknown";
}

int
shm_role_parse(const char *name, enum role_kind *out)
{
    for (int i = 0; i < ROLE__COUNT; i++) {
        if (strcmp(name, shm_role_names[i]) == 0) {
            *out = (enum role_kind)i;
            return 0;
        }
    }
    return -1;
}

const char *
shm_state_name(enum slot_state state)
{
    return (unsigned)state < SLOT__COUNT ? shm_state_names[state] : "unknown";
}

int64_t
shm_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t
shm_mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void
shm_name(char *buf, size_t cap, const char *instance)
{
    snprintf(buf, cap, "/paymentd.%s", instance);
}

static void
shm_init_layout(struct shm_segment *seg)
{
    memset(seg, 0, sizeof(*seg));
    seg->layout_version = SHM_LAYOUT_VERSION;
    seg->slot_count = SHM_MAX_SLOTS;
    atomic_store(&seg->created_ms, shm_now_ms());
    for (int i = 0; i < SHM_MAX_SLOTS; i++)
        atomic_store(&seg->slots[i].last_exit, SHM_EXIT_NONE);
    /* The magic goes last: a reader that sees it sees an initialised layout. */
    atomic_thread_fence(memory_order_release);
    seg->magic = SHM_MAGIC;
}

static struct shm_segment *
shm_map(int fd, char *err, size_t errlen, const char *name)
{
    void *p = mmap(NULL, sizeof(struct shm_segment), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        snprintf(err, errlen, "shared memory %s: mmap: %s", name, strerror(errno));
        return NULL;
    }
    return p;
}

static int
shm_check_layout(struct shm_segment *seg, const char *name, char *err, size_t errlen)
{
    if (seg->magic != SHM_MAGIC) {
        snprintf(err, errlen, "shared memory %s is not a paymentd segment", name);
        return -1;
    }
    if (seg->layout_version != SHM_LAYOUT_VERSION || seg->slot_count != SHM_MAX_SLOTS) {
        snprintf(err, errlen,
                 "shared memory %s has layout version %u, this binary needs %u: stop every "
                 "paymentd process of this instance and start again",
                 name, seg->layout_version, SHM_LAYOUT_VERSION);
        return -1;
    }
    return 0;
}

struct shm_segment *
shm_create(const char *instance, char *err, size_t errlen)
{
    char name[128];
    struct shm_segment *seg;
    int fd;

    shm_name(name, sizeof(name), instance);
    fd = shm_open(name, O_RDWR, 0600);
    if (fd >= 0) {
        struct stat st;
        if (fstat(fd, &st) == 0 && (size_t)st.st_size >= sizeof(struct shm_segment)) {
            seg = shm_map(fd, err, errlen, name);
            if (seg) {
                int32_t pid = seg->magic == SHM_MAGIC ? atomic_load(&seg->supervisor_pid) : 0;
                shm_detach(seg);
                if (pid > 0 && pid != getpid() && kill(pid, 0) == 0) {
                    close(fd);
                    snprintf(err, errlen,
                             "instance is already running (supervisor pid %d owns shared memory "
                             "%s); set INSTANCE to run another",
                             pid, name);
                    return NULL;
                }
            }
        }
        close(fd);
        shm_unlink(name);
    }
    fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        snprintf(err, errlen, "shared memory %s: shm_open: %s", name, strerror(errno));
        return NULL;
    }
    if (ftruncate(fd, sizeof(struct shm_segment)) < 0) {
        snprintf(err, errlen, "shared memory %s: ftruncate: %s", name, strerror(errno));
        close(fd);
        shm_unlink(name);
        return NULL;
    }
    seg = shm_map(fd, err, errlen, name);
    close(fd);
    if (!seg) {
        shm_unlink(name);
        return NULL;
    }
    shm_init_layout(seg);
    atomic_store(&seg->supervisor_pid, getpid());
    return seg;
}

struct shm_segment *
shm_attach(const char *instance, bool create_if_missing, char *err, size_t errlen)
{
    char name[128];
    struct shm_segment *seg;
    struct stat st;
    int fd;
    bool fresh = false;

    shm_name(name, sizeof(name), instance);
    fd = shm_open(name, O_RDWR, 0600);
    if (fd < 0 && errno == ENOENT && create_if_missing) {
        fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
        if (fd >= 0) {
            fresh = true;
            if (ftruncate(fd, sizeof(struct shm_segment)) < 0) {
                snprintf(err, errlen, "shared memory %s: ftruncate: %s", name, strerror(errno));
                close(fd);
                return NULL;
            }
        } else if (errno == EEXIST) {
            fd = shm_open(name, O_RDWR, 0600);
        }
    }
    if (fd < 0) {
        snprintf(err, errlen, "shared memory %s: %s", name, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) < 0 || (size_t)st.st_size != sizeof(struct shm_segment)) {
        close(fd);
        snprintf(err, errlen,
                 "shared memory %s has the size of another layout version (this binary "
                 "needs version %u): stop every paymentd process of this instance and start "
                 "again",
                 name, SHM_LAYOUT_VERSION);
        return NULL;
    }
    seg = shm_map(fd, err, errlen, name);
    close(fd);
    if (!seg)
        return NULL;
    if (fresh)
        shm_init_layout(seg);
    if (shm_check_layout(seg, name, err, errlen) < 0) {
        shm_detach(seg);
        return NULL;
    }
    return seg;
}

void
shm_detach(struct shm_segment *seg)
{
    if (seg)
        munmap(seg, sizeof(*seg));
}

void
shm_remove(const char *instance)
{
    char name[128];
    shm_name(name, sizeof(name), instance);
    shm_unlink(name);
}

int
shm_slot_claim(struct shm_segment *seg, enum role_kind role, int index)
{
    for (int i = 0; i < SHM_MAX_SLOTS; i++) {
        struct shm_slot *s = &seg->slots[i];
        if (atomic_load(&s->in_use) == 1 && atomic_load(&s->role) == (uint32_t)role &&
            atomic_load(&s->index) == (uint32_t)index)
            return i;
    }
    for (int i = 0; i < SHM_MAX_SLOTS; i++) {
        struct shm_slot *s = &seg->slots[i];
        uint32_t expected = 0;
        if (atomic_compare_exchange_strong(&s->in_use, &expected, 2)) {
            atomic_store(&s->role, (uint32_t)role);
            atomic_store(&s->index, (uint32_t)index);
            atomic_store(&s->in_use, 1); /* published: role and index are valid */
            return i;
        }
    }
    return -1;
}
