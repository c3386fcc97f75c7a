"""A client in its own process that starts one long generation and reports each chunk on stdout.

`--exit-after N` ends the process with os._exit after N chunks: the kernel closes the socket with no
gRPC goodbye (no RST_STREAM, no GOAWAY). Without it the client reads until it is killed.
"""

from __future__ import annotations

import argparse
import os
import queue

import grpc

from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc


def main(args: argparse.Namespace) -> None:
    channel = grpc.insecure_channel(args.address)
    requests: queue.SimpleQueue[pb.GenerateRequest | None] = queue.SimpleQueue()
    requests.put(pb.GenerateRequest(start=pb.Start(request_id=args.request_id, prompt=" hello world")))
    # The request side stays open (no half-close), as for a client that may still interrupt.
    responses = pb_grpc.TokenWireStub(channel).Generate(iter(requests.get, None))
    chunks = 0
    for response in responses:
        kind = response.WhichOneof("kind")
        print(kind, flush=True)
        if kind == "chunk":
            chunks += 1
            if args.exit_after and chunks >= args.exit_after:
                os._exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("request_id")
    parser.add_argument("--exit-after", type=int, default=0)
    main(parser.parse_args())
