"""The tokenwire server: gRPC service, engine, scheduler, model runner."""

# Process settings the libraries read once, when first imported: set here, where every service
# module passes before torch, transformers or tokenizers load (the server imports torch late).
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads spin a while at the end of each parallel kernel before they sleep: the next
# kernel comes within microseconds, and sleeping waits made a step ~1.6x slower here. Bounded
# (libgomp's default is 300,000 spins) so idle threads do sleep; when other processes hold a
# core the step drops to fewer threads instead (cpu_threads.py). Only effective when set before
# torch is first imported.
os.environ.setdefault("GOMP_SPINCOUNT", "50000")
