/* Dispatch-latency probe: allowlisted as a job command (LM_EVAL_PATHS), it ignores lm-eval's
 * arguments and, as its first action, writes CLOCK_MONOTONIC in nanoseconds to ./stamp (the
 * job's directory). CLOCK_MONOTONIC is one clock for every process on a Linux machine, so the
 * bench compares it with the time it sent POST /job. A compiled program, so the figure holds
 * no interpreter start-up of the probe itself. */
#include <stdio.h>
#include <time.h>

int main(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    FILE *out = fopen("stamp", "w");
    if (out == NULL) return 1;
    fprintf(out, "%lld\n", (long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    return fclose(out) != 0;
}
