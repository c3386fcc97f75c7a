/* The kernels' threads (thread_pool.c): run fn(ctx, i) for i in 0..items-1 on up to `threads`
 * threads, the caller included. Returns when every item is done. Which thread runs an item never
 * changes its result: items write disjoint outputs. */
#ifndef TOKENWIRE_THREAD_POOL_H
#define TOKENWIRE_THREAD_POOL_H

#include <stdint.h>

typedef void (*item_fn)(void *ctx, int64_t item);

void parallel_for(int64_t items, int threads, item_fn fn, void *ctx);

#endif
