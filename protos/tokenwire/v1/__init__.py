"""The tokenwire.v1 contract: generated protobuf messages and gRPC stubs (never edited by hand)."""
