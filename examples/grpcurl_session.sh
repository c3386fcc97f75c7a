#!/usr/bin/env bash
# A grpcurl session with a tokenwire server: what it serves, what a message looks like, a streaming
# Generate from JSON, the unary calls and health. Reflection is on in the server, so no .proto is needed
# to call it; the field documentation, though, is only in the .proto (reflection carries no comments).
#
#   examples/grpcurl_session.sh [ADDRESS]        (GRPCURL=/path/to/grpcurl to pick the binary)
#
# Every command is echoed so that it can be pasted into a shell (with the virtualenv active, or with
# grpcurl spelled .venv/bin/grpcurl).
set -euo pipefail

address=${1:-127.0.0.1:50051}
here=$(cd "$(dirname "$0")" && pwd)
protos=$(cd "$here/../protos" && pwd)
# The dev dependencies put grpcurl in the project's virtualenv.
grpcurl=${GRPCURL:-$(command -v grpcurl || echo "$here/../.venv/bin/grpcurl")}

# Shows each command as it could be pasted into a shell (JSON arguments single-quoted), then runs it.
quoted() {
    local arg out="" q="'"
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:@=+-]+$ ]]; then
            out+=" $arg"
        else
            out+=" '${arg//$q/$q\\$q$q}'"  # a ' inside becomes '\''
        fi
    done
    printf '%s' "${out# }"
}
step() { printf '\n$ grpcurl %s\n' "$(quoted "$@")"; "$grpcurl" "$@"; }

step -plaintext "$address" list
step -plaintext "$address" describe tokenwire.v1.TokenWire
step -plaintext "$address" describe tokenwire.v1.Start
# The same message described from the .proto (no server needed): with its documentation.
step -import-path "$protos" -proto tokenwire/v1/tokenwire.proto describe tokenwire.v1.Interrupt

# One JSON request message per object on stdin; the response stream prints as it arrives: started,
# chunks (here one per word), then finished with the reason, the usage and the timings.
generate='{"start": {"requestId": "grpcurl-1",
           "chat": {"messages": [{"role": "user", "content": "Say hello in five words."}]},
           "stopping": {"maxTokens": 24},
           "output": {"chunking": "CHUNKING_WORD"}}}'
printf "\n\$ grpcurl -plaintext -d @ %s tokenwire.v1.TokenWire/Generate <<'JSON'\n%s\nJSON\n" "$address" "$generate"
"$grpcurl" -plaintext -d @ "$address" tokenwire.v1.TokenWire/Generate <<<"$generate"

step -plaintext -d '{}' "$address" tokenwire.v1.TokenWire/GetModelInfo
step -plaintext -d '{"text": "Hello, world"}' "$address" tokenwire.v1.TokenWire/Tokenize
# Cancel is idempotent: an id that is not live answers found = false (printed as {}).
step -plaintext -d '{"requestId": "grpcurl-1"}' "$address" tokenwire.v1.TokenWire/Cancel
step -plaintext "$address" grpc.health.v1.Health/Check
