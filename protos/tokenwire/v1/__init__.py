"""The tokenwire.v1 contract: generated protobuf messages and gRPC stubs (never edited by hand), and
`metadata`, the header names the contract uses (written by hand)."""
