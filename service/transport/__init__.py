"""The transport floor: gRPC wiring, the servicer, protobuf <-> engine types, auth, metrics, interceptors.

The only floor that imports grpc or the generated `tokenwire.v1` code. Below it: the engine.
"""
