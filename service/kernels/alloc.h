/* The kernels' allocations go through kernel_malloc (alloc.c), so tests can make one fail. */
#ifndef TOKENWIRE_ALLOC_H
#define TOKENWIRE_ALLOC_H

#include <stddef.h>

void *kernel_malloc(size_t bytes);

#endif
