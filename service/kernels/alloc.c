/* kernel_malloc: malloc, except that a test may ask for one allocation to fail
 * (kernels_fail_allocation), to check that a failed step ends its requests and nothing else. */
#include <stdatomic.h>
#include <stdlib.h>

#include "alloc.h"
#include "kernels.h"

static _Atomic int64_t fail_countdown = -1;  /* -1: never; n: the n-th allocation from now fails */

void kernels_fail_allocation(int64_t after) { atomic_store(&fail_countdown, after); }

void *kernel_malloc(size_t bytes) {
    /* One relaxed load on the usual path: a few allocations per step. */
    if (atomic_load_explicit(&fail_countdown, memory_order_relaxed) >= 0 &&
        atomic_fetch_sub(&fail_countdown, 1) == 0)
        return NULL;
    return malloc(bytes);
}
