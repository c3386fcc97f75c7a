"""The kernel floor: C block matmuls, attention and the whole decode step, and their bindings."""
