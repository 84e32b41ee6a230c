/*
 * Shared-memory collectives for tp_engine.comm.shm (compiled at first use,
 * loaded with ctypes). The Python side owns the mapping and its layout; this
 * file only spins on sequence counters and moves/sums bytes.
 *
 * Protocol (the pure-Python path in shm.py speaks exactly the same one):
 *   - every rank has an "arrive" counter and a "done" counter, each on its
 *     own cache line, and two data slots (double buffering by seq parity);
 *   - collective number `seq` (1, 2, ...): a rank copies its payload into
 *     slot[seq & 1][rank], then publishes arrive = seq (release store), then
 *     waits until every rank's arrive >= seq (acquire loads), then reads.
 *   - a rank can only overwrite slot[seq & 1] again at collective seq + 2,
 *     which needs every rank to have arrived at seq + 1, i.e. to have
 *     finished reading collective seq. So no second barrier is needed.
 *   - large all-reduces use two phases: after arriving, rank r sums its
 *     chunk of every slot (in rank order) into a shared result area, publishes
 *     done = seq, waits for every done >= seq, and copies the whole result.
 * Sums are always slot[0] + slot[1] + ... in rank order, element by element
 * (no reassociation: never build this with -ffast-math), so every rank gets
 * bitwise identical results whichever algorithm it used.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__) || defined(__arm__)
#define CPU_RELAX() __asm__ __volatile__("yield" ::: "memory")
#else
#define CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

#define TP_SHM_ABI 1

enum { DT_F32 = 0, DT_F64 = 1, DT_I32 = 2, DT_I64 = 3 };

typedef struct {
    char *base;            /* start of the mapping */
    int world;
    int rank;
    int64_t hdr_off;       /* rank r's counters at base + hdr_off + r * hdr_stride */
    int64_t hdr_stride;
    int64_t done_off;      /* done counter: arrive counter + done_off */
    int64_t data_off;      /* slot (p, r) at base + data_off + (p * world + r) * slot_bytes */
    int64_t slot_bytes;
    int64_t result_off;    /* shared result area (slot_bytes long) */
    int64_t two_phase_min; /* all-reduces of at least this many bytes use two phases */
    double spin_s;         /* busy-wait this long before yielding the CPU */
    double yield_s;        /* then sched_yield this long before sleeping */
    double timeout_s;      /* then give up */
} tp_shm_ctx;

int tp_shm_abi(void) { return TP_SHM_ABI; }

tp_shm_ctx *tp_shm_new(char *base, int world, int rank, int64_t hdr_off, int64_t hdr_stride,
                       int64_t done_off, int64_t data_off, int64_t slot_bytes,
                       int64_t result_off, int64_t two_phase_min, double spin_s,
                       double yield_s, double timeout_s) {
    tp_shm_ctx *c = (tp_shm_ctx *)calloc(1, sizeof(tp_shm_ctx));
    if (!c) return NULL;
    c->base = base;
    c->world = world;
    c->rank = rank;
    c->hdr_off = hdr_off;
    c->hdr_stride = hdr_stride;
    c->done_off = done_off;
    c->data_off = data_off;
    c->slot_bytes = slot_bytes;
    c->result_off = result_off;
    c->two_phase_min = two_phase_min;
    c->spin_s = spin_s;
    c->yield_s = yield_s;
    c->timeout_s = timeout_s;
    return c;
}

void tp_shm_free(tp_shm_ctx *c) { free(c); }

void tp_shm_set_timeout(tp_shm_ctx *c, double timeout_s) { c->timeout_s = timeout_s; }

static inline uint64_t *arrive_ctr(const tp_shm_ctx *c, int r) {
    return (uint64_t *)(c->base + c->hdr_off + (int64_t)r * c->hdr_stride);
}

static inline uint64_t *done_ctr(const tp_shm_ctx *c, int r) {
    return (uint64_t *)(c->base + c->hdr_off + (int64_t)r * c->hdr_stride + c->done_off);
}

static inline char *slot(const tp_shm_ctx *c, uint64_t seq, int r) {
    return c->base + c->data_off + ((int64_t)(seq & 1) * c->world + r) * c->slot_bytes;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Wait until counter(r) >= seq for every rank. Returns -1, or the first rank
 * that did not get there within the timeout. Spins briefly (the common case
 * on idle cores: peers arrive within microseconds), then yields the CPU so
 * oversubscribed ranks (more ranks than cores) can run, then sleeps. */
static int wait_all(const tp_shm_ctx *c, int done, uint64_t seq) {
    double start = -1.0, elapsed = 0.0;
    for (int r = 0; r < c->world; r++) {
        uint64_t *ctr = done ? done_ctr(c, r) : arrive_ctr(c, r);
        unsigned spins = 0;
        while (__atomic_load_n(ctr, __ATOMIC_ACQUIRE) < seq) {
            if (start < 0) start = now_s();
            if (elapsed < c->spin_s) {
                CPU_RELAX();
            } else if (elapsed < c->yield_s) {
                sched_yield();
            } else {
                struct timespec ts = {0, 50000}; /* 50 us */
                nanosleep(&ts, NULL);
            }
            if ((++spins & 15u) == 0 || elapsed >= c->yield_s) {
                elapsed = now_s() - start;
                if (elapsed > c->timeout_s) return r;
            }
        }
    }
    return -1;
}

/* Copy `nbytes` from src into this rank's slot, arrive, wait for everyone.
 * Returns 0, or 1 + the rank that did not arrive. */
int tp_shm_exchange(tp_shm_ctx *c, const void *src, int64_t nbytes, uint64_t seq) {
    if (nbytes > 0) memcpy(slot(c, seq, c->rank), src, (size_t)nbytes);
    __atomic_store_n(arrive_ctr(c, c->rank), seq, __ATOMIC_RELEASE);
    int missing = wait_all(c, 0, seq);
    return missing < 0 ? 0 : missing + 1;
}

#define DEFINE_SUM(NAME, T)                                                          \
    static void NAME(T *restrict out, const tp_shm_ctx *c, uint64_t seq, int64_t lo, \
                     int64_t hi) {                                                   \
        const T *restrict s0 = (const T *)slot(c, seq, 0);                           \
        if (c->world == 1) {                                                         \
            for (int64_t i = lo; i < hi; i++) out[i] = s0[i];                        \
            return;                                                                  \
        }                                                                            \
        const T *restrict s1 = (const T *)slot(c, seq, 1);                           \
        for (int64_t i = lo; i < hi; i++) out[i] = s0[i] + s1[i];                    \
        for (int r = 2; r < c->world; r++) {                                         \
            const T *restrict sr = (const T *)slot(c, seq, r);                       \
            for (int64_t i = lo; i < hi; i++) out[i] += sr[i];                       \
        }                                                                            \
    }

DEFINE_SUM(sum_f32, float)
DEFINE_SUM(sum_f64, double)
DEFINE_SUM(sum_i32, int32_t)
DEFINE_SUM(sum_i64, int64_t)

static int elem_size(int dtype) {
    switch (dtype) {
    case DT_F32: case DT_I32: return 4;
    case DT_F64: case DT_I64: return 8;
    default: return 0;
    }
}

static void sum_range(int dtype, void *out, const tp_shm_ctx *c, uint64_t seq, int64_t lo,
                      int64_t hi) {
    switch (dtype) {
    case DT_F32: sum_f32((float *)out, c, seq, lo, hi); break;
    case DT_F64: sum_f64((double *)out, c, seq, lo, hi); break;
    case DT_I32: sum_i32((int32_t *)out, c, seq, lo, hi); break;
    case DT_I64: sum_i64((int64_t *)out, c, seq, lo, hi); break;
    }
}

/* In-place sum of `count` elements at buf over all ranks, in rank order.
 * Returns 0, 1 + the rank that did not arrive, or -1 for a bad dtype/size.
 * Two-phase all-reduces use seq and the done counters; one collective. */
int tp_shm_allreduce(tp_shm_ctx *c, void *buf, int64_t count, int dtype, uint64_t seq) {
    int es = elem_size(dtype);
    int64_t nbytes = count * es;
    if (es == 0 || nbytes > c->slot_bytes) return -1;
    int rc = tp_shm_exchange(c, buf, nbytes, seq);
    if (rc) return rc;
    if (nbytes < c->two_phase_min || c->world < 2) {
        sum_range(dtype, buf, c, seq, 0, count);
        return 0;
    }
    /* Chunk boundaries on 16-element (64+ byte) multiples, so ranks never
     * write the same cache line of the result area. */
    int64_t blocks = (count + 15) / 16;
    int64_t lo = (blocks * c->rank / c->world) * 16;
    int64_t hi = (blocks * (c->rank + 1) / c->world) * 16;
    if (hi > count) hi = count;
    if (lo > count) lo = count;
    char *result = c->base + c->result_off;
    sum_range(dtype, result, c, seq, lo, hi);
    __atomic_store_n(done_ctr(c, c->rank), seq, __ATOMIC_RELEASE);
    int missing = wait_all(c, 1, seq);
    if (missing >= 0) return missing + 1;
    memcpy(buf, result, (size_t)nbytes);
    return 0;
}
