#!/usr/bin/env bash
# A grpcurl session with a tokenwire server: what it serves, what a message looks like, a streaming
# Generate from JSON, the unary calls and health. Reflection is on in the server, so no .proto is needed.
#
#   examples/grpcurl_session.sh [ADDRESS]        (GRPCURL=/path/to/grpcurl to pick the binary)
set -euo pipefail

address=${1:-127.0.0.1:50051}
here=$(cd "$(dirname "$0")" && pwd)
# The dev dependencies put grpcurl in the project's virtualenv.
grpcurl=${GRPCURL:-$(command -v grpcurl || echo "$here/../.venv/bin/grpcurl")}

step() { printf '\n$ grpcurl %s\n' "$*"; "$grpcurl" "$@"; }

step -plaintext "$address" list
step -plaintext "$address" describe tokenwire.v1.TokenWire
step -plaintext "$address" describe tokenwire.v1.Start

# One JSON request message per object on stdin; the response stream prints as it arrives: started,
# chunks (here one per word), then finished with the reason, the usage and the timings.
printf '\n$ grpcurl -plaintext -d @ %s tokenwire.v1.TokenWire/Generate <<EOF ...\n' "$address"
"$grpcurl" -plaintext -d @ "$address" tokenwire.v1.TokenWire/Generate <<'JSON'
{"start": {"requestId": "grpcurl-1",
           "chat": {"messages": [{"role": "user", "content": "Say hello in five words."}]},
           "stopping": {"maxTokens": 24},
           "output": {"chunking": "CHUNKING_WORD"}}}
JSON

step -plaintext -d '{}' "$address" tokenwire.v1.TokenWire/GetModelInfo
step -plaintext -d '{"text": "Hello, world"}' "$address" tokenwire.v1.TokenWire/Tokenize
# Cancel is idempotent: an id that is not live answers found = false (printed as {}).
step -plaintext -d '{"requestId": "grpcurl-1"}' "$address" tokenwire.v1.TokenWire/Cancel
step -plaintext "$address" grpc.health.v1.Health/Check
