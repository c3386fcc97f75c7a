"""The model floor: loading models, the torch runner, KV cache and attention, sampling, quantized layers.

`types.py` holds the plain types a runner takes and returns (no torch, so the engine can import
them); every other module here may use torch. Below it: the C kernels.
"""
