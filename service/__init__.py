"""The tokenwire server: gRPC service, engine, scheduler, model runner."""

# Process settings the libraries read once, when first imported: set here, where every service
# module passes before torch, transformers or tokenizers load (the server imports torch late).
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's OpenMP threads spin a while at the end of each parallel op before they sleep (libgomp's
# default: 300,000 spins, ~3 ms here at ~140 cycles a pause). The decode step runs on the C
# kernels' own threads (thread_pool.c), and a torch thread still spinning after a torch op took
# a core from them: one row's step measured ~12.5 ms with 50,000 spins, ~8 ms with 1,000 (~60 us,
# still enough to chain torch's ops within a prefill). Only effective when set before torch is
# first imported.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
