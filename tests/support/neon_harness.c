/*
 * Drives gguf_gemm.c's entry points from a byte stream, for tests that run
 * an AArch64 (NEON) build under qemu-user where torch cannot run
 * (tests/test_neon_kernels.py writes the requests and checks the answers).
 *
 * stdin: requests until op 0, each a header
 *     int32 op, int32 t, int64 M, int64 K, int64 N, int32 a, int32 b, int64 xn, int64 wn
 * then xn float32 (x) and wn bytes (the blocks). op 1: tp_gguf_gemm(t, x, M, K, w, N, y, a, b);
 * 2: tp_gguf_gemm_i8(..., rr = a); 3: tp_gguf_quantize_x(t, x, M, K, ...); 4: tp_gguf_dequant(t, w, N,
 * K, ...); 5: tp_gguf_is_neon(); 6: run the following calls on a threads (a pthread per share, as
 * tp_engine's pool hands them out; 1: the calling thread only). stdout per request: int32 rc, int64 n, n bytes of results (op 1, 2:
 * y float32 (M, N); 3: q int8 (M, K), d float32 (M, K / rc), s int16 (M, K / 32); 4: float32 (N, K)).
 * Little-endian host layout throughout (both ends are little-endian).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int tp_gguf_gemm(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int rr, int mc);
int tp_gguf_gemm_i8(int t, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, float *y, int rr);
int tp_gguf_quantize_x(int t, const float *x, int64_t M, int64_t K, int8_t *q, float *d, int16_t *s);
int tp_gguf_dequant(int t, const uint8_t *w, int64_t N, int64_t K, float *y);
int tp_gguf_is_neon(void);
typedef void (*tp_job_fn)(void *arg, int t, int n);
typedef void (*tp_run_fn)(tp_job_fn fn, void *arg, int max_n, int64_t work);
void tp_gguf_set_pool(tp_run_fn run);

/* the pool: fn(arg, t, n) for t < n = min(threads, max_n), t = 0 on the calling thread */
static int threads = 1;
typedef struct {
    tp_job_fn fn;
    void *arg;
    int t, n;
} share_t;
static void *share(void *p) {
    const share_t *s = (const share_t *)p;
    s->fn(s->arg, s->t, s->n);
    return 0;
}
static void run_threads(tp_job_fn fn, void *arg, int max_n, int64_t work) {
    (void)work;
    const int n = threads < max_n ? threads : max_n;
    pthread_t th[64];
    share_t sh[64];
    for (int t = 1; t < n; t++) {
        sh[t] = (share_t){fn, arg, t, n};
        if (pthread_create(&th[t], 0, share, &sh[t])) {
            fprintf(stderr, "neon_harness: pthread_create failed\n");
            exit(3);
        }
    }
    fn(arg, 0, n);
    for (int t = 1; t < n; t++) pthread_join(th[t], 0);
}

#pragma pack(push, 1)
typedef struct {
    int32_t op, t;
    int64_t M, K, N;
    int32_t a, b;
    int64_t xn, wn;
} req_t;
#pragma pack(pop)

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "neon_harness: out of memory (%zu bytes)\n", n);
        exit(3);
    }
    return p;
}

static void get(void *p, size_t n) {
    if (n && fread(p, 1, n, stdin) != n) {
        fprintf(stderr, "neon_harness: short input\n");
        exit(2);
    }
}

static void reply(int32_t rc, const void *p, int64_t n) {
    fwrite(&rc, 4, 1, stdout);
    fwrite(&n, 8, 1, stdout);
    if (n) fwrite(p, 1, (size_t)n, stdout);
}

int main(void) {
    req_t r;
    tp_gguf_set_pool(run_threads);
    for (;;) {
        get(&r, sizeof r);
        if (r.op == 0) break;
        float *x = (float *)xmalloc((size_t)r.xn * sizeof(float));
        uint8_t *w = (uint8_t *)xmalloc((size_t)r.wn);
        get(x, (size_t)r.xn * sizeof(float));
        get(w, (size_t)r.wn);
        if (r.op == 1 || r.op == 2) {
            float *y = (float *)xmalloc((size_t)(r.M * r.N) * sizeof(float));
            const int rc = r.op == 1 ? tp_gguf_gemm(r.t, x, r.M, r.K, w, r.N, y, r.a, r.b)
                                     : tp_gguf_gemm_i8(r.t, x, r.M, r.K, w, r.N, y, r.a);
            reply(rc, y, rc ? 0 : (int64_t)(r.M * r.N) * 4);
            free(y);
        } else if (r.op == 3) {
            const int64_t nq = r.M * r.K, nd = r.M * (r.K / 32); /* d: at most one per 32 inputs */
            uint8_t *out = (uint8_t *)xmalloc((size_t)(nq + 4 * nd + 2 * nd));
            int8_t *q = (int8_t *)out;
            float *d = (float *)xmalloc((size_t)nd * sizeof(float));
            int16_t *s = (int16_t *)xmalloc((size_t)nd * sizeof(int16_t));
            const int rc = tp_gguf_quantize_x(r.t, x, r.M, r.K, q, d, s);
            int64_t n = 0;
            if (rc > 0) { /* q, then the rc-input scales, then the sums */
                const int64_t ndx = r.M * (r.K / rc);
                for (int64_t i = 0; i < ndx; i++) ((float *)(out + nq))[i] = d[i];
                for (int64_t i = 0; i < nd; i++) ((int16_t *)(out + nq + 4 * ndx))[i] = s[i];
                n = nq + 4 * ndx + 2 * nd;
            }
            reply(rc, out, n);
            free(out);
            free(d);
            free(s);
        } else if (r.op == 4) {
            float *y = (float *)xmalloc((size_t)(r.N * r.K) * sizeof(float));
            const int rc = tp_gguf_dequant(r.t, w, r.N, r.K, y);
            reply(rc, y, rc ? 0 : (int64_t)(r.N * r.K) * 4);
            free(y);
        } else if (r.op == 5) {
            reply(tp_gguf_is_neon(), "", 0);
        } else if (r.op == 6 && r.a >= 1 && r.a <= 64) {
            threads = r.a;
            reply(0, "", 0);
        } else {
            fprintf(stderr, "neon_harness: unknown op %d\n", r.op);
            return 2;
        }
        free(x);
        free(w);
    }
    fflush(stdout);
    return 0;
}
