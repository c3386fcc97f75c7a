"""The engine floor: requests, the step loop, scheduling, sessions, detokenizing and segmenting.

Plain Python: no grpc, no protobuf, no torch. It drives a model runner through the protocol in
`runner.py` and names request fields in its own terms (`requests.RequestField`).
"""
