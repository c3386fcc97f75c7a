"""Metadata keys of the tokenwire.v1 contract, for servers and clients alike.

Written by hand: scripts/gen_protos.py writes only the `*_pb2*` modules beside it.
"""

from __future__ import annotations

from typing import Final

# Generate answers with this header in its initial metadata, naming the replica that serves the
# stream (when the server has a replica id). A client sends it back on Cancel, so that a proxy
# routes the Cancel to that replica.
REPLICA_HEADER: Final = "x-tokenwire-replica"
