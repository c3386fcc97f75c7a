/* A small pool of helper threads for the C kernels, in place of OpenMP.
 *
 * Why not OpenMP: an OpenMP parallel region waits at its end for every thread of the team, so a
 * thread that the OS has parked (another process, our own event loop, the gRPC threads) stalls
 * the region until it runs again. A decode step is ~150 regions; on 2 busy cores one step took
 * 156 ms instead of 4.4. And libgomp stops spinning almost at once (100 spins) as soon as any
 * second thread in the process has ever run a torch op, which made the step 4x slower there.
 *
 * Here the caller never waits for a helper that has not started: items are claimed one at a time
 * from a shared counter, the caller claims too, and it waits only for items a helper has already
 * claimed. A parked helper costs nothing; on a busy machine the step degrades to one thread's
 * speed instead of collapsing. Helpers spin a little (~100 us) between jobs, then sleep.
 */
#include "thread_pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#define MAX_HELPERS 63
#define SPINS 2000  /* pause instructions (~140 cycles each here) before a helper sleeps */

typedef struct {
    item_fn fn;
    void *ctx;
    int64_t items;
    int threads;  /* the caller and the helpers that may join */
    int helpers;  /* how many helpers may join this job */
    atomic_int joined;
    _Alignas(64) atomic_llong next;  /* each counter on its own cache line */
    _Alignas(64) atomic_llong done;
} Job;

static struct {
    _Alignas(64) atomic_ullong generation;  /* bumped for every job; helpers spin on it */
    _Alignas(64) pthread_mutex_t master;  /* one job at a time; a second caller runs its items alone */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int helpers;  /* started */
    _Atomic(Job *) job;  /* the job running now, NULL between jobs */
    atomic_int active;  /* helpers between reading `job` and leaving it */
    atomic_int sleeping;
} pool = {.master = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Items are claimed in shrinking chunks, half of what is left per thread (OpenMP's "guided"):
 * few claims while much is left, single items at the end, so that no thread finishes a whole
 * large chunk after the others are done. Fixed chunks of ~1/8 of a job left one thread working
 * alone for up to that long at the end of every job. */
static void run_items(Job *job) {
    int64_t begin = atomic_load(&job->next);
    for (;;) {
        if (begin >= job->items) return;
        int64_t chunk = (job->items - begin) / (2 * job->threads);
        if (chunk < 1) chunk = 1;
        if (!atomic_compare_exchange_weak(&job->next, &begin, begin + chunk)) continue;  /* reloaded */
        for (int64_t i = begin; i < begin + chunk; i++) job->fn(job->ctx, i);
        atomic_fetch_add(&job->done, chunk);
        begin = atomic_load(&job->next);
    }
}

static void *helper_main(void *arg) {
    (void)arg;
    unsigned long long seen = atomic_load(&pool.generation);
    for (;;) {
        int spins = 0;
        while (atomic_load(&pool.generation) == seen) {
            if (++spins < SPINS) { relax(); continue; }
            pthread_mutex_lock(&pool.lock);
            atomic_fetch_add(&pool.sleeping, 1);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            atomic_fetch_sub(&pool.sleeping, 1);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load(&pool.generation);
        /* `active` before `job`: the caller clears `job`, then waits for `active` to drop, so a
         * job seen here is still alive until we leave it. */
        atomic_fetch_add(&pool.active, 1);
        Job *job = atomic_load(&pool.job);
        if (job && atomic_fetch_add(&job->joined, 1) < job->helpers) run_items(job);
        atomic_fetch_sub(&pool.active, 1);
    }
    return 0;
}

static void after_fork_in_child(void);
static void register_fork_handler(void) { pthread_atfork(0, 0, after_fork_in_child); }

/* A forked child has none of the helpers: start from an empty pool (and unlocked mutexes). */
static void after_fork_in_child(void) {
    pthread_mutex_init(&pool.master, 0);
    pthread_mutex_init(&pool.lock, 0);
    pthread_cond_init(&pool.wake, 0);
    pool.helpers = 0;
    atomic_store(&pool.job, (Job *)0);
    atomic_store(&pool.active, 0);
    atomic_store(&pool.sleeping, 0);
}

static void start_helpers(int wanted) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    pthread_mutex_lock(&pool.lock);
    while (pool.helpers < wanted && pool.helpers < MAX_HELPERS) {
        pthread_t thread;
        if (pthread_create(&thread, 0, helper_main, 0)) break;
        pthread_detach(thread);
        pool.helpers++;
    }
    pthread_mutex_unlock(&pool.lock);
}

void parallel_for(int64_t items, int threads, item_fn fn, void *ctx) {
    if (threads <= 1 || items <= 1 || pthread_mutex_trylock(&pool.master)) {
        for (int64_t i = 0; i < items; i++) fn(ctx, i);
        return;
    }
    if (pool.helpers < threads - 1) start_helpers(threads - 1);
    Job job = {.fn = fn, .ctx = ctx, .items = items, .threads = threads, .helpers = threads - 1};
    atomic_init(&job.next, 0);
    atomic_init(&job.done, 0);
    atomic_init(&job.joined, 0);
    atomic_store(&pool.job, &job);
    atomic_fetch_add(&pool.generation, 1);
    if (atomic_load(&pool.sleeping)) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run_items(&job);
    atomic_store(&pool.job, (Job *)0);
    while (atomic_load(&job.done) < items || atomic_load(&pool.active)) relax();
    pthread_mutex_unlock(&pool.master);
}
