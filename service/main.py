"""The tokenwire-server command: flags (each with a TOKENWIRE_* environment fallback), logging set-up,
loading the model runner, signals, and the server's life from start to drain.

It sits above the floors and imports the model (torch) only once a model is to be loaded, so
`--help` and a busy port answer at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import tokenwire
from tokenwire.service.engine.engine import Engine, EngineConfig
from tokenwire.service.engine.runner import Runner
from tokenwire.service.model.kv_budget import DEFAULT_KV_CACHE_MIB  # plain Python: no torch
from tokenwire.service.transport.auth import TokensFileError
from tokenwire.service.transport.server import BindError, ServerConfig, host_port, serve, tls_problem
from tokenwire.service.transport.servicer import DEFAULT_HEARTBEAT_S, DEFAULT_MAX_STREAMS_PER_PRINCIPAL

log = logging.getLogger("tokenwire.server")

T = TypeVar("T")

# Exit codes (listed in --help; argparse exits 2 on bad flags).
EXIT_OK = 0  # stopped by a signal: drained, stopped at once after a second signal, or during the load
EXIT_LOAD_FAILED = 1  # the model could not be loaded
EXIT_BAD_FLAGS = 2  # as argparse: a flag's value cannot be used (also an unusable --auth-tokens-file)
EXIT_BIND_FAILED = 3  # an address to listen on could not be bound (a port in use, ...)
EXIT_TLS_FAILED = 4  # the TLS files cannot be used (unreadable, not PEM, a key not of the certificate)
# A quarter of the default --max-live-requests: one named caller cannot fill the server, and a few
# busy ones still leave room for the rest.
DEFAULT_LIVE_REQUESTS_PER_PRINCIPAL = 64


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how the engine runs it."""

    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    weights: str = "auto"
    activations: str = "auto"
    max_batch_size: int = EngineConfig.max_batch_size
    max_context: int | None = None
    kv_cache_bytes: int = DEFAULT_KV_CACHE_MIB * 2**20  # the KV cache's most: the context follows from it
    chat_template: str | None = None  # a family's name or a Jinja file, in place of the model's own
    threads: int = 0  # torch intra-op threads; 0: one per core, fewer while other processes hold cores
    max_live_requests: int = EngineConfig.max_live_requests
    max_live_requests_per_principal: int = DEFAULT_LIVE_REQUESTS_PER_PRINCIPAL
    prefill_tokens_per_step: int = EngineConfig.prefill_tokens_per_step
    max_prompt_chars: int = EngineConfig.max_prompt_chars
    max_chat_messages: int = EngineConfig.max_chat_messages
    saved_kv_bytes: int = EngineConfig.saved_kv_bytes
    # Where a prompt token's attention costs as much as the rest of its prefill: measured for the
    # default model in decoder_step.c here (128-token chunks at positions 0 to 3,000: ~0.44 ms a
    # token of matmuls, ~0.43 us a position of attention; 640 when attention took ~0.67 us).
    # Without it a 256-token chunk at position ~8,000 stalled the running streams ~1.5 s.
    prefill_attention_span: int = 1024

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            max_batch_size=self.max_batch_size,
            prefill_tokens_per_step=self.prefill_tokens_per_step,
            prefill_attention_span=self.prefill_attention_span,
            max_live_requests=self.max_live_requests,
            max_live_requests_per_owner=self.max_live_requests_per_principal,
            max_prompt_chars=self.max_prompt_chars,
            max_chat_messages=self.max_chat_messages,
            saved_kv_bytes=self.saved_kv_bytes,
        )


# ---- logging ----

_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `extra=` fields (request_id, reason, ...) become keys."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_ATTRS)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# ---- the tokenwire-server command ----


def load_runner(config: ModelConfig) -> Runner:
    """Load and warm up the model (blocking: run it off the event loop)."""
    from tokenwire.service.model.runner import ModelRunner  # torch: only when a model is loaded

    started = time.monotonic()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    runner = ModelRunner.load(
        config.model,
        device=config.device,
        dtype=config.dtype,
        weights=config.weights,
        activations=config.activations,
        max_batch_size=config.max_batch_size,
        max_context=config.max_context,
        kv_cache_bytes=config.kv_cache_bytes,
        chat_template=config.chat_template,
    )
    if not config.threads:
        runner.adapt_threads()
    runner.warm_up()
    log.info(
        "model %s loaded from %s in %.1f s (device %s, dtype %s, weights %s, context %d, batch %d)",
        runner.name,
        runner.source,
        time.monotonic() - started,
        runner.device,
        runner.dtype,
        runner.weights,
        runner.context_length,
        runner.max_batch_size,
    )
    return runner


async def _in_daemon_thread(fn: Callable[[], T]) -> T:
    """Like asyncio.to_thread, but a signal during a slow model load can end the process at once
    (asyncio.run waits for the default executor's threads on the way out)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn()
        except BaseException as error:
            outcome: tuple[T | None, BaseException | None] = (None, error)
        else:
            outcome = (result, None)
        # A closed loop: the server stopped during the load, and nobody waits for its result any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name="tokenwire-load", daemon=True).start()
    return await future


def _bind_advice(error: BindError) -> str:
    """What to do about an address that cannot be bound, in the flags (and variables) that set it."""
    if not error.in_use:
        return f"check {'--metrics-host' if error.metrics else '--host'} and the port"
    if error.metrics:
        return "choose another port with --metrics-port N (or TOKENWIRE_METRICS_PORT=N)"
    if error.http:
        return "choose another port with --http-port N (or TOKENWIRE_HTTP_PORT=N)"
    return "choose another port with --port N (or TOKENWIRE_PORT=N; with make serve: PORT=N)"


async def run_server(server_config: ServerConfig, model_config: ModelConfig) -> int:
    """Serve until SIGTERM/SIGINT, then drain; a second signal stops at once. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stop_now = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            log.warning("received %s again: stopping now", sig.name)
            stop_now.set()
        else:
            log.info("received %s: shutting down (send it again to stop now)", sig.name)
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    try:
        server = await serve(None, server_config)
    except BindError as error:
        what = "serve metrics" if error.metrics else "serve the HTTP API" if error.http else "listen"
        log.error("cannot %s on %s: %s; %s", what, error.address, error.reason, _bind_advice(error))
        return EXIT_BIND_FAILED
    except TokensFileError as error:
        log.error("cannot use --auth-tokens-file: %s", error)
        return EXIT_BAD_FLAGS
    log.info("listening on %s (NOT_SERVING while model %r loads)", server.address, model_config.model)
    if server.http_port:
        log.info("OpenAI-compatible HTTP API on %s/v1", server.http_url)
    if server.metrics_port:
        log.info(
            "metrics on http://%s/metrics",
            host_port(server_config.metrics_host, server.metrics_port),
        )
    loading = asyncio.ensure_future(_in_daemon_thread(lambda: load_runner(model_config)))
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not loading.done():
        loading.cancel()  # the loading thread runs on: main ends the process without waiting for it
        await server.stop(0)
        log.info("stopped during model load")
        return EXIT_OK
    try:
        runner = loading.result()
    except Exception as error:
        from tokenwire.service.model.architectures import UnsupportedModelError  # loaded by now
        from tokenwire.service.model.kv_budget import KVBudgetError
        from tokenwire.service.model.templates import ChatTemplateError

        # A refusal that says what to change (what is supported, a flag): no traceback.
        if isinstance(error, UnsupportedModelError | KVBudgetError | ChatTemplateError):
            log.error("cannot serve model %r: %s", model_config.model, error)
        else:
            log.exception("could not load model %r", model_config.model)
        stopping.cancel()
        await server.stop(0)
        return EXIT_LOAD_FAILED
    engine = Engine(runner, model_config.engine_config())
    engine.start()
    await server.attach(engine)
    log.info("SERVING on %s", server.address)
    await stopping
    draining = asyncio.ensure_future(server.stop())
    hurrying = asyncio.ensure_future(stop_now.wait())
    await asyncio.wait({draining, hurrying}, return_when=asyncio.FIRST_COMPLETED)
    hurrying.cancel()
    if draining.done():
        draining.result()
        log.info("stopped")
    else:
        await server.stop_now()
        log.info("stopped now")
    # 0 after a stop now as well: it is an order carried out, not a failure, and a supervisor reads
    # any other code as a crash (systemd's Restart=on-failure would restart the server the operator
    # just stopped). What was cut short is in the log and in each client's Error message.
    return EXIT_OK


_TRUE = {"1", "true", "yes", "on"}


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a limit of 0 would refuse every request)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


class _Flags:
    """argparse flags that each also read TOKENWIRE_<NAME> from the environment (shown in --help)."""

    def __init__(self, parser: argparse.ArgumentParser | Any) -> None:
        self.parser = parser

    def add(self, flag: str, help: str = "", *, secret: bool = False, **kwargs: Any) -> None:
        env = "TOKENWIRE_" + flag.lstrip("-").replace("-", "_").upper()
        value = os.environ.get(env)
        if kwargs.get("action") == "store_true":
            if value is not None:
                kwargs["default"] = value.strip().lower() in _TRUE
            self.parser.add_argument(flag, help=f"{help} [env {env}=1]", **kwargs)
            return
        if value is not None:
            kwargs["default"] = value  # a string default goes through `type`, so it is validated too
        if "metavar" not in kwargs and "choices" not in kwargs:
            kwargs["metavar"] = {int: "N", float: "SECONDS"}.get(kwargs.get("type", str), "TEXT")
        shown = "" if secret else "; default: %(default)s"
        self.parser.add_argument(flag, help=f"{help} [env {env}{shown}]", **kwargs)


_EPILOG = """\
Keepalive: the server pings a connection after --keepalive-time seconds without traffic and drops it
when no answer comes within --keepalive-timeout, so requests of vanished clients are aborted and
NAT/load-balancer idle timers do not cut a stream that is silent during a long prefill. Clients may
ping as often as every --min-client-ping-interval seconds (also with no call in flight) without being
told GOAWAY: set the client's grpc.keepalive_time_ms to at least that. Streams are never cut for age.
Proxies answer pings themselves and do not forward them, so behind a proxy a quiet Generate stream is
kept open by Heartbeat messages instead: the server sends one after --heartbeat-interval seconds without
a response, tokenwire's client one after as long without a request (see deploy/ for proxy settings).

Signals: SIGTERM or SIGINT drains: health NOT_SERVING, new Starts refused with UNAVAILABLE, running
generations get --grace-period seconds, then end with STOP_REASON_SHUTDOWN (the client may retry them
elsewhere). A second SIGTERM or SIGINT stops now: each live generation gets an Error (UNAVAILABLE, "the
server is stopping now") instead of the rest of its output. A signal while the model loads stops at once.

Exit codes: 0 stopped by a signal (drained, stopped now, or during the model load); 1 the model could
not be loaded; 2 bad flags; 3 an address could not be bound (a port in use: choose another with --port,
--metrics-port or --http-port); 4 the TLS files cannot be used (unreadable, not PEM, or a --tls-key that
does not match the --tls-cert certificate).

Auth: with --auth-token or --auth-tokens-file every RPC but grpc.health.v1.Health (reflection and Cancel
included) needs the metadata "authorization: Bearer <token>"; prefer the TOKENWIRE_AUTH_TOKEN variable
to the flag, which other users can see in the process list. The token names the caller (a principal):
request ids, sessions, Cancel, Interrupt and "already live" refusals are each principal's own, and one
principal cannot see, touch or probe another's. Under mutual TLS without tokens, the client
certificate's common name is the principal. Without either, every caller is one anonymous principal:
anyone who can connect can cancel any request and use any session by its id.

HTTP (--http-port, off by default): an OpenAI-compatible API on the same engine, so its requests batch
with gRPC's. The same tokens (header "Authorization: Bearer <token>"; /health is open) and, with
--tls-cert, HTTPS with the same files; under mutual TLS it names callers by token only, so it needs
tokens. Unknown request fields are ignored, as OpenAI does; fields it cannot honour (n > 1, tools, ...)
answer 400 naming them. finish_reason is "stop", "length", or "abort" when the generation was stopped
(client gone, gRPC Cancel of its id, shutdown). A client that hangs up stops its generation.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenwire-server",
        description="Serve a language model over gRPC (tokenwire.v1.TokenWire), streaming tokens.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tokenwire {tokenwire.__version__}")
    listen = _Flags(parser.add_argument_group("listening"))
    listen.add("--host", metavar="ADDRESS", help="address to listen on", default="127.0.0.1")
    listen.add("--port", "port to listen on (0: any free port, logged)", type=int, default=50051)
    listen.add("--no-reflection", "turn off gRPC server reflection", action="store_true")
    listen.add(
        "--max-message-bytes", "largest request or response message", type=int, default=4 * 1024 * 1024
    )
    listen.add("--metrics-port", "serve Prometheus metrics on this port (0: off)", type=int, default=0)
    listen.add(
        "--http-port",
        "serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models, "
        "/health) on --host at this port, with the same engine, tokens and TLS as gRPC (0: off; 8000 is "
        "the usual choice)",
        type=int,
        default=0,
    )
    listen.add(
        "--metrics-host",
        metavar="ADDRESS",
        help="address for the metrics endpoint; it has no auth, so it stays on localhost unless you name "
        "one (0.0.0.0 for a Prometheus scraper from outside the pod or host)",
        default="127.0.0.1",
    )
    listen.add("--grace-period", "seconds running generations get on shutdown", type=float, default=30.0)
    listen.add(
        "--keepalive-time",
        "seconds of silence before the server pings a connection",
        type=float,
        default=30.0,
    )
    listen.add("--keepalive-timeout", "seconds to wait for a ping's answer", type=float, default=10.0)
    listen.add(
        "--min-client-ping-interval",
        "shortest interval between client pings allowed",
        type=float,
        default=10.0,
    )
    listen.add(
        "--max-connection-idle",
        "close connections idle this long (seconds; 0: never)",
        type=float,
        default=0.0,
    )
    listen.add(
        "--heartbeat-interval",
        "send a Heartbeat message on a Generate stream that has sent nothing this long, so that a "
        "proxy's idle timeout (nginx: 60 s) does not cut it (0: never)",
        type=float,
        default=DEFAULT_HEARTBEAT_S,
    )

    security = _Flags(parser.add_argument_group("security"))
    security.add(
        "--tls-cert", metavar="PEM", help="server certificate chain (PEM); turns TLS on", default=None
    )
    security.add("--tls-key", metavar="PEM", help="server private key (PEM)", default=None)
    security.add(
        "--tls-client-ca",
        metavar="PEM",
        help="CA bundle (PEM) for client certificates: mutual TLS",
        default=None,
    )
    security.add(
        "--replica-id",
        metavar="ID",
        help="this replica's name behind a load balancer: sent as the x-tokenwire-replica header on "
        "Generate and put in front of server-assigned request ids, so a proxy can route Cancel to "
        "the replica that holds the request (see the README)",
        default="",
    )
    security.add(
        "--auth-token",
        metavar="TOKEN",
        help="bearer token required on every RPC but health; its caller is the principal 'default'",
        default=None,
        secret=True,
    )
    security.add(
        "--auth-tokens-file",
        metavar="FILE",
        help="named bearer tokens, one '<name> <token>' a line ('#' comments): each name is a principal "
        "with its own request ids and sessions; read again within a second of a change",
        default=None,
    )
    security.add(
        "--operators",
        metavar="NAMES",
        help="comma-separated principals (token names, or client certificate common names under mutual "
        "TLS) whose Cancel stops any principal's request with that id",
        default="",
    )
    security.add(
        "--max-live-requests-per-principal",
        "live requests one named principal may have (0: only --max-live-requests; the anonymous caller "
        "of a server without auth has only --max-live-requests)",
        type=int,
        default=DEFAULT_LIVE_REQUESTS_PER_PRINCIPAL,
    )
    security.add(
        "--max-streams-per-principal",
        "open Generate streams one principal may have, the anonymous one included (0: no limit)",
        type=int,
        default=DEFAULT_MAX_STREAMS_PER_PRINCIPAL,
    )
    security.add(
        "--health-port",
        "also serve grpc.health.v1 alone, in plaintext, on this port, for probes that cannot present a "
        "client certificate under mutual TLS (0: off)",
        type=int,
        default=0,
    )
    security.add(
        "--health-host",
        metavar="ADDRESS",
        help="address for --health-port (the pod's address, or 0.0.0.0, for a Kubernetes probe)",
        default="127.0.0.1",
    )

    model = _Flags(parser.add_argument_group("model and engine"))
    model.add(
        "--model",
        "'default' (embedded SmolLM2-135M-Instruct), a model folder or a .gguf file",
        metavar="SPEC",
        default="default",
    )
    model.add("--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N", default="auto")
    model.add("--dtype", "model dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    model.add(
        "--weights",
        "auto: a GGUF file's layers run on their own blocks on CPU (Q4_0/1, Q5_0/1, Q8_0, Q2_K-Q6_K, "
        "IQ4_NL, IQ4_XS); "
        "dense: unpack every layer; q8_0: also quantize every layer still dense (a model folder's) to Q8_0 "
        "blocks at load, for the C step (outputs then the Q8_0 weights', as llama.cpp's from a Q8_0 file)",
        default="auto",
        choices=["auto", "dense", "q8_0"],
    )
    model.add(
        "--activations",
        "what those 4-bit layers multiply: auto: rounded to 8 bits per block of 32 where the CPU has "
        "AVX512-VNNI (as llama.cpp does; ~2x faster); float32: as they are",
        default="auto",
        choices=["auto", "float32"],
    )
    model.add(
        "--max-batch-size",
        "sequences decoded at once (KV cache slots)",
        type=int,
        default=EngineConfig.max_batch_size,
    )
    model.add(
        "--max-context",
        "cap on prompt plus generated tokens (default: the model's, or what --kv-cache-mib holds)",
        type=int,
        default=None,
    )
    model.add(
        "--kv-cache-mib",
        "memory the KV cache may take, in MiB, for --max-batch-size sequences at once: the context is "
        "the model's, or the longest that fits (logged at start; refused when not even 256 tokens fit). "
        "Taken as it fills, not at start",
        type=_positive_int,
        metavar="MIB",
        default=DEFAULT_KV_CACHE_MIB,
    )
    model.add(
        "--chat-template",
        "the chat template, in place of the model's own (from its GGUF file or tokenizer config): a Jinja "
        "file, or one of chatml, gemma, llama3, mistral, phi3 (each as that family's tokenizer config has "
        "it; a reply also ends at its end-of-turn token). Without either, chat requests are refused",
        metavar="NAME|FILE",
        default=None,
    )
    model.add(
        "--threads",
        "torch threads for the model (0: one per core, one fewer for each core other processes keep "
        "busy, so waiting threads never spin on a core another process holds)",
        type=int,
        default=0,
    )
    model.add(
        "--max-live-requests",
        "live requests before RESOURCE_EXHAUSTED",
        type=int,
        default=EngineConfig.max_live_requests,
    )
    model.add(
        "--max-prompt-chars",
        "longest prompt or Tokenize text, and most characters of a chat's roles and contents in all, "
        "refused with INVALID_ARGUMENT before it is tokenized (the tokenizer thread is shared: a huge "
        "input would hold up every request's tokenizing)",
        type=_positive_int,
        metavar="N",
        default=EngineConfig.max_prompt_chars,
    )
    model.add(
        "--max-chat-messages",
        "most messages in a chat, refused with INVALID_ARGUMENT before it is tokenized",
        type=_positive_int,
        metavar="N",
        default=EngineConfig.max_chat_messages,
    )
    model.add(
        "--prefix-cache-mib",
        "KV cache kept after requests end, in MiB: sessions' first, the rest for automatic prefix reuse "
        "(a request that starts like a recent one of the same principal copies its KV instead of "
        "prefilling it), least recently used out first (0: keep none)",
        type=int,
        metavar="MIB",
        default=EngineConfig.saved_kv_bytes // 2**20,
    )
    model.add(
        "--prefill-tokens-per-step",
        "prompt tokens prefilled per engine step (bounds how long a long prompt stalls running streams)",
        type=int,
        default=EngineConfig.prefill_tokens_per_step,
    )
    model.add(
        "--prefill-attention-span",
        "prompt position at which a token's attention costs as much as the rest of its prefill: deeper "
        "tokens count for more of --prefill-tokens-per-step, so deep chunks stall streams no longer (0: off)",
        type=int,
        default=ModelConfig.prefill_attention_span,
    )

    logs = _Flags(parser.add_argument_group("logging"))
    logs.add(
        "--log-level",
        "log level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
    )
    logs.add("--log-format", "text or json (one object per line)", default="text", choices=["text", "json"])
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[ServerConfig, ModelConfig]:
    server = ServerConfig(
        host=args.host,
        port=args.port,
        reflection=not args.no_reflection,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        auth_token=args.auth_token or None,
        auth_tokens_file=args.auth_tokens_file or None,
        operators=tuple(name.strip() for name in args.operators.split(",") if name.strip()),
        max_streams_per_principal=args.max_streams_per_principal,
        health_port=args.health_port,
        health_host=args.health_host,
        replica_id=args.replica_id,
        max_message_bytes=args.max_message_bytes,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        http_port=args.http_port or None,
        grace_period_s=args.grace_period,
        keepalive_time_s=args.keepalive_time,
        keepalive_timeout_s=args.keepalive_timeout,
        min_client_ping_interval_s=args.min_client_ping_interval,
        max_connection_idle_s=args.max_connection_idle,
        heartbeat_interval_s=args.heartbeat_interval,
    )
    model = ModelConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        activations=args.activations,
        max_batch_size=args.max_batch_size,
        max_context=args.max_context,
        kv_cache_bytes=args.kv_cache_mib * 2**20,
        chat_template=args.chat_template or None,
        threads=args.threads,
        max_live_requests=args.max_live_requests,
        max_live_requests_per_principal=args.max_live_requests_per_principal,
        prefill_tokens_per_step=args.prefill_tokens_per_step,
        max_prompt_chars=args.max_prompt_chars,
        max_chat_messages=args.max_chat_messages,
        saved_kv_bytes=args.prefix_cache_mib * 2**20,
        prefill_attention_span=args.prefill_attention_span,
    )
    return server, model


def main(argv: Sequence[str] | None = None) -> NoReturn:
    parser = build_parser()
    args = parser.parse_args(argv)
    server_config, model_config = configs_from_args(args)
    if bool(server_config.tls_cert) != bool(server_config.tls_key) or (
        server_config.tls_client_ca and not server_config.tls_cert
    ):
        parser.error("TLS needs --tls-cert and --tls-key (and both for --tls-client-ca)")
    if (
        server_config.http_port
        and server_config.tls_client_ca
        and not (server_config.auth_token or server_config.auth_tokens_file)
    ):
        parser.error("--http-port under mutual TLS needs --auth-token or --auth-tokens-file (see --help)")
    configure_logging(args.log_level, args.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download a model at run time
    # Checked here, before anything binds: gRPC would report a bad pair only as "Failed to bind to
    # address", which reads like a port in use.
    problem = tls_problem(server_config)
    if problem is not None:
        log.error("cannot serve TLS: %s", problem)
        code = EXIT_TLS_FAILED
    else:
        code = asyncio.run(run_server(server_config, model_config))
    # The process ends here, without the interpreter's finalization: a daemon thread may still run
    # native code (the model loading after a signal during the load, a step after a stop now), and
    # finalization tears such a thread down where it stands: std::terminate inside torch ("terminate
    # called without an active exception", SIGABRT) or a half-printed traceback. The server is
    # stopped and nothing else needs cleaning up; the logs are flushed first.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
