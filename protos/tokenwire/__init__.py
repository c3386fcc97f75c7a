"""tokenwire: stream tokens from a language model over gRPC, and stop them the moment you ask.

Subpackages: `tokenwire.v1` (the generated contract), `tokenwire.client` (light: no torch),
`tokenwire.service` (the server).
"""

__version__ = "0.1.0"
