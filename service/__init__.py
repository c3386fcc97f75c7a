"""The tokenwire server: gRPC service, engine, scheduler, model runner."""

# Process settings the libraries read once, when first imported: set here, where every service
# module passes before torch, transformers or tokenizers load (the server imports torch late).
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# torch's OpenMP threads spin a while at the end of each parallel op before they sleep: the next
# op comes within microseconds, and sleeping waits made torch's ops ~1.6x slower here (plain
# `generate`: 18 instead of 29 tokens/s with 1,000 spins). Bounded (libgomp's default is 300,000
# spins) so idle threads do sleep; when other processes hold a core the step drops to fewer threads
# instead (cpu_threads.py). The C decode step has threads of its own (thread_pool.c) and no torch
# op that wakes torch's threads, so their spinning does not take its cores. Only effective when set
# before torch is first imported.
os.environ.setdefault("GOMP_SPINCOUNT", "50000")
