/* A job with a known memory image, for tests and benchmarks of checkpoints.
 *
 * memhog MIB random|text [PERIOD_MS]: fills MIB MiB of heap (incompressible random bytes, or
 * compressible text), then counts forever, printing the count every PERIOD_MS (default 200 ms).
 * SIGUSR1 rewrites the next 5% of the region (contiguous, wrapping), as a job that keeps most of
 * its memory and changes a little between two checkpoints. With MEMHOG_LOCK=PATH in its
 * environment it first takes an exclusive flock on PATH (created if need be) and holds it.
 */
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t touch_requests;
static void on_usr1(int sig) { (void)sig; touch_requests++; }

static unsigned long long rng = 0x9E3779B97F4A7C15ULL;
static unsigned long long next_random(void) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return rng;
}

static void fill(unsigned char *p, size_t n, int random) {
    static const char text[] = "ACGTTGCAACGGTTAC chr1 1000 . A G 50 PASS DP=30;AF=0.5\n";
    for (size_t i = 0; i < n; i += 8) {
        if (random) {
            unsigned long long r = next_random();
            memcpy(p + i, &r, n - i < 8 ? n - i : 8);
        } else {
            for (size_t j = 0; j < 8 && i + j < n; j++) p[i + j] = text[(i + j) % (sizeof text - 1)];
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage: memhog MIB random|text [PERIOD_MS]\n"); return 2; }
    size_t size = (size_t)atol(argv[1]) << 20;
    int random = strcmp(argv[2], "random") == 0;
    long period = argc > 3 ? atol(argv[3]) : 200;
    unsigned char *mem = malloc(size ? size : 1);
    if (!mem) { perror("malloc"); return 1; }
    fill(mem, size, random);
    const char *lock = getenv("MEMHOG_LOCK");
    if (lock) {
        int fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0 || flock(fd, LOCK_EX) != 0) { perror(lock); return 1; }
    }
    signal(SIGUSR1, on_usr1);
    size_t slice = size / 20, offset = 0;
    printf("ready %zu MiB\n", size >> 20);
    fflush(stdout);
    struct timespec ts = {period / 1000, (period % 1000) * 1000000L};
    for (unsigned long count = 1;; count++) {
        while (touch_requests > 0 && slice) {
            touch_requests--;
            fill(mem + offset, slice, random);
            offset = (offset + slice) % (size - slice + 1);
            printf("touched 5%%\n");
        }
        printf("count %lu\n", count);
        fflush(stdout);
        nanosleep(&ts, NULL);
    }
}
