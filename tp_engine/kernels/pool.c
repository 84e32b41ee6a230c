/*
 * One persistent thread pool per process for the decode-path kernels
 * (tp_engine.kernels.threads; used by cpu_gemm.c and gguf_gemm.c).
 *
 * A token's matmul takes tens of microseconds, so the pool must start a job
 * in about a microsecond: the workers stay alive between jobs, spin on the
 * job word (with a pause instruction) for a bounded time after a job, then sleep on a condition variable until the next one wakes them. An
 * idle server rank therefore costs nothing after the spin, and a busy one
 * never pays a wake-up between the matmuls of a token.
 *
 * tp_pool_run(fn, arg, max_n, work) calls fn(arg, t, n) for t = 0 .. n - 1
 * and returns when all have; n is the pool's size, at most max_n and at most
 * work / min_work (a tiny matmul is not worth waking anyone). Kernels split
 * their output rows by (t, n) only, so each output element is computed by
 * one thread in one fixed order. Which thread runs task t is not fixed: the
 * caller (worker 0) and the workers claim tasks from one counter, so a
 * worker that is slow to wake (asleep, or its core busy with another
 * process) does not hold the matmul up: the caller runs its task instead.

 * One caller at a time: a second thread calling while a job runs (thread
 * ranks of one process, a drafting thread) runs its job serially instead of
 * waiting. Results do not depend on the thread count, so this is only slower.
 *
 * Workers pin themselves: worker t (t >= 1) to CPU t of the calling thread's
 * affinity mask when the pool starts (so a rank already restricted to a CPU
 * set keeps its threads inside it), in the order tp_pool_set_cpus gave (the
 * rank's TP_ENGINE_CPUS: distinct physical cores first) where it was given.
 * The caller is not pinned: threads it creates later (torch's OpenMP pool
 * among them) would inherit its one CPU.
 *
 * Fork: the workers do not exist in a child, so a pthread_atfork child
 * handler (and a pid check, for a fork that skips the handlers) forgets them;
 * the child's first job starts its own, with the same configured size.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define TP_POOL_ABI 1
#define MAXT 256
/* The job word: (generation << 18) | (n << 9) | next task to claim. One
 * word, so a claim (a compare-and-swap) can only take a task of the job the
 * claimer saw posted, never one of the next job posted meanwhile. */
#define TBITS 9 /* n, and the next task, <= MAXT */
#define TMASK ((1u << TBITS) - 1)
#define GEN(w) ((w) >> (2 * TBITS))
#define NTASKS(w) ((int)(((w) >> TBITS) & TMASK))

typedef void (*tp_job_fn)(void *arg, int t, int n);

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static struct {
    pthread_mutex_t run_lock; /* held by the one caller of a parallel job (and by resizing) */
    pthread_mutex_t lock;     /* sleep / wake-up */
    pthread_cond_t wake, done_cv;
    int want;    /* configured threads, the caller included */
    int started; /* threads running now, the caller included (1: no workers) */
    int live;    /* 0: (re)start the workers at the next job */
    pid_t pid;   /* the process that started them */
    pthread_t tid[MAXT];
    int cpus[MAXT], ncpu;   /* where worker t pins itself: cpus[t % ncpu] */
    int order[MAXT], norder; /* preferred order of CPUs (tp_pool_set_cpus), 0: the mask's */
    int pin;                 /* 0: workers float (a machine shared with other busy processes) */
    uint64_t gen0;          /* GEN of the job word when the workers started */
    _Atomic uint64_t job;   /* see TBITS; n = 0: stop */
    _Atomic int done;       /* tasks of the current job finished */
    _Atomic int sleepers;   /* workers asleep (or about to be) on wake */
    _Atomic int caller_waits;
    tp_job_fn fn; /* the current job, written before it is posted */
    void *arg;
    _Atomic int64_t spin_ns; /* how long a worker (and the caller) spins before sleeping */
    _Atomic int64_t min_work; /* bytes of weights a thread must have to be woken */
    _Atomic uint64_t jobs[MAXT]; /* tasks run per worker (tests: did threads run?) */
} P = {
    .run_lock = PTHREAD_MUTEX_INITIALIZER,
    .lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
    .want = 1,
    .started = 1,
    .pin = 1,
    .spin_ns = 150000,
    .min_work = 32768,
};

int tp_pool_abi(void) { return TP_POOL_ABI; }

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Spin, then sleep, until a job after generation seen is posted; returns the job word. */
static uint64_t wait_job(uint64_t seen) {
    uint64_t w;
    const int64_t spin = atomic_load_explicit(&P.spin_ns, memory_order_relaxed);
    if (spin > 0) {
        const int64_t end = now_ns() + spin;
        for (unsigned i = 1;; i++) {
            w = atomic_load_explicit(&P.job, memory_order_acquire);
            if (GEN(w) != seen) return w;
            cpu_relax();
            if (!(i & 63) && now_ns() > end) break;
        }
    }
    /* sleepers is raised before the job word is read again, and the caller
     * posts before it reads sleepers (both sequentially consistent): either
     * the caller sees a sleeper and broadcasts under the lock, or this sees
     * the new job. */
    pthread_mutex_lock(&P.lock);
    atomic_fetch_add(&P.sleepers, 1);
    while (GEN(w = atomic_load(&P.job)) == seen) pthread_cond_wait(&P.wake, &P.lock);
    atomic_fetch_sub(&P.sleepers, 1);
    pthread_mutex_unlock(&P.lock);
    return w;
}

/* A task of the job of generation gen, or -1 when it has none left (or is over). */
static int claim(uint64_t gen) {
    uint64_t w = atomic_load(&P.job);
    while (GEN(w) == gen && (int)(w & TMASK) < NTASKS(w))
        if (atomic_compare_exchange_weak(&P.job, &w, w + 1)) return (int)(w & TMASK);
    return -1;
}

/* Run the tasks this thread (worker `self`) can claim; the last one to finish wakes a
 * caller that went to sleep (the same pairing as sleepers / the job word). */
static void work_on(uint64_t gen, int n, int self) {
    for (int t; (t = claim(gen)) >= 0;) {
        P.fn(P.arg, t, n); /* stable: the caller posts nothing new before this task is done */
        atomic_fetch_add_explicit(&P.jobs[self], 1, memory_order_relaxed);
        if (atomic_fetch_add(&P.done, 1) + 1 == n && atomic_load(&P.caller_waits)) {
            pthread_mutex_lock(&P.lock);
            pthread_cond_broadcast(&P.done_cv);
            pthread_mutex_unlock(&P.lock);
        }
    }
}

static void pin_self(int t) {
#ifdef __linux__
    if (P.pin && P.ncpu > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(P.cpus[t % P.ncpu], &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set); /* best effort */
    }
#else
    (void)t;
#endif
}

static void *worker(void *p) {
    const int t = (int)(intptr_t)p;
    pin_self(t);
    uint64_t seen = P.gen0; /* not the word now: a job may already have been posted */
    for (;;) {
        const uint64_t w = wait_job(seen);
        seen = GEN(w);
        if (NTASKS(w) == 0) break; /* stop */
        work_on(seen, NTASKS(w), t);
    }
    return NULL;
}

/* Post a job of n tasks (run_lock held: one writer of new jobs). */
static uint64_t post(int n) {
    const uint64_t gen = GEN(atomic_load(&P.job)) + 1;
    atomic_store(&P.job, (gen << (2 * TBITS)) | ((uint64_t)n << TBITS)); /* sequentially consistent */
    return gen;
}

static void stop_workers(void) {
    if (P.started > 1 && P.pid == getpid()) {
        post(0);
        pthread_mutex_lock(&P.lock);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.lock);
        for (int t = 1; t < P.started; t++) pthread_join(P.tid[t], NULL);
    }
    P.started = 1;
    P.live = 0;
}

/* Start want - 1 workers (run_lock held); fewer if thread creation fails. */
static void start_workers(void) {
    P.pid = getpid();
    P.started = 1;
    P.live = 1;
    P.ncpu = 0;
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        /* the preferred order (one CPU per physical core first), inside the mask */
        for (int i = 0; i < P.norder; i++)
            if (P.order[i] >= 0 && P.order[i] < CPU_SETSIZE && CPU_ISSET(P.order[i], &set)) P.cpus[P.ncpu++] = P.order[i];
        if (P.ncpu == 0)
            for (int c = 0; c < CPU_SETSIZE && P.ncpu < MAXT; c++)
                if (CPU_ISSET(c, &set)) P.cpus[P.ncpu++] = c;
    }
#endif
    P.gen0 = GEN(atomic_load(&P.job));
    /* workers never take signals: Python handles them on the main thread */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (int t = 1; t < P.want; t++) {
        if (pthread_create(&P.tid[t], NULL, worker, (void *)(intptr_t)t)) break;
        P.started = t + 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* The child of a fork: the workers stayed in the parent, and a lock may
 * have been held there by a thread that does not exist here. */
static void after_fork_child(void) {
    pthread_mutex_init(&P.run_lock, NULL);
    pthread_mutex_init(&P.lock, NULL);
    pthread_cond_init(&P.wake, NULL);
    pthread_cond_init(&P.done_cv, NULL);
    P.started = 1;
    P.live = 0;
    P.pid = 0;
    atomic_store(&P.sleepers, 0);
    atomic_store(&P.caller_waits, 0);
    for (int t = 0; t < MAXT; t++) atomic_store(&P.jobs[t], 0);
}

__attribute__((constructor)) static void register_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_child); }

void tp_pool_run(tp_job_fn fn, void *arg, int max_n, int64_t work) {
    int n = P.want < max_n ? P.want : max_n;
    const int64_t mw = atomic_load_explicit(&P.min_work, memory_order_relaxed);
    if (mw > 0 && work / mw < n) n = (int)(work / mw);
    if (n <= 1 || pthread_mutex_trylock(&P.run_lock)) {
        fn(arg, 0, 1);
        atomic_fetch_add_explicit(&P.jobs[0], 1, memory_order_relaxed);
        return;
    }
    if (!P.live || P.pid != getpid()) { /* first job, after a resize, or first in a forked child */
        if (P.pid != getpid()) P.started = 1; /* a fork that skipped the handler: the workers are not here */
        else stop_workers();
        start_workers();
    }
    if (n > P.started) n = P.started;
    if (n <= 1) {
        pthread_mutex_unlock(&P.run_lock);
        fn(arg, 0, 1);
        atomic_fetch_add_explicit(&P.jobs[0], 1, memory_order_relaxed);
        return;
    }
    P.fn = fn;
    P.arg = arg;
    atomic_store(&P.done, 0);
    const uint64_t gen = post(n);
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.lock);
        pthread_cond_broadcast(&P.wake);
        pthread_mutex_unlock(&P.lock);
    }
    work_on(gen, n, 0);
    /* every task is claimed; wait for the ones other threads are still running */
    if (atomic_load_explicit(&P.done, memory_order_acquire) != n) {
        const int64_t end = now_ns() + atomic_load_explicit(&P.spin_ns, memory_order_relaxed);
        for (unsigned i = 1; atomic_load_explicit(&P.done, memory_order_acquire) != n; i++) {
            cpu_relax();
            if (!(i & 63) && now_ns() > end) { /* a worker was descheduled mid-task: sleep until it is done */
                pthread_mutex_lock(&P.lock);
                atomic_store(&P.caller_waits, 1);
                while (atomic_load(&P.done) != n) pthread_cond_wait(&P.done_cv, &P.lock);
                atomic_store(&P.caller_waits, 0);
                pthread_mutex_unlock(&P.lock);
                break;
            }
        }
    }
    pthread_mutex_unlock(&P.run_lock);
}

/* Threads per job from now on (the caller included; 1: no workers). The
 * workers are re-created at the next job, pinned within the affinity mask
 * the calling thread has then. Returns the size, clamped to 1 .. MAXT. */
int tp_pool_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > MAXT) n = MAXT;
    pthread_mutex_lock(&P.run_lock);
    stop_workers();
    P.want = n;
    pthread_mutex_unlock(&P.run_lock);
    return n;
}

/* The order in which workers take CPUs (the rank's TP_ENGINE_CPUS: one CPU
 * of every physical core first, then their SMT siblings); CPUs outside the
 * affinity mask are skipped; n = 0: the mask's own order. From the next job. */
void tp_pool_set_cpus(const int *cpus, int n) {
    if (n < 0) n = 0;
    if (n > MAXT) n = MAXT;
    pthread_mutex_lock(&P.run_lock);
    for (int i = 0; i < n; i++) P.order[i] = cpus[i];
    P.norder = n;
    stop_workers();
    pthread_mutex_unlock(&P.run_lock);
}

/* Whether workers pin themselves (default 1). A pinned worker cannot move
 * when another process takes its core: on a machine shared with busy
 * processes, floating workers wait less. From the next job. */
void tp_pool_set_pin(int pin) {
    pthread_mutex_lock(&P.run_lock);
    P.pin = pin != 0;
    stop_workers();
    pthread_mutex_unlock(&P.run_lock);
}

int tp_pool_threads(void) { return P.want; }

/* Threads running now, the caller included (0 before the first job in this process). */
int tp_pool_started(void) { return P.pid == getpid() ? P.started : 0; }

/* spin_us < 0 and min_work < 0 leave a setting as it is. */
void tp_pool_tune(int64_t spin_us, int64_t min_work) {
    pthread_mutex_lock(&P.run_lock);
    if (spin_us >= 0) atomic_store(&P.spin_ns, spin_us * 1000);
    if (min_work >= 0) atomic_store(&P.min_work, min_work);
    pthread_mutex_unlock(&P.run_lock);
}

int64_t tp_pool_spin_us(void) { return atomic_load(&P.spin_ns) / 1000; }
int64_t tp_pool_min_work(void) { return atomic_load(&P.min_work); }

uint64_t tp_pool_jobs(int t) { return t >= 0 && t < MAXT ? atomic_load(&P.jobs[t]) : 0; }

void tp_pool_reset_jobs(void) {
    for (int t = 0; t < MAXT; t++) atomic_store(&P.jobs[t], 0);
}

/* The CPU worker t pinned itself to (-1: none, or no such worker). Tests. */
int tp_pool_cpu(int t) {
    if (t < 1 || t >= P.started || !P.pin || P.ncpu == 0 || P.pid != getpid()) return -1;
    return P.cpus[t % P.ncpu];
}
