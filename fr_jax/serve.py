"""`python -m fr_jax.serve`: the fused model behind an OpenAI-compatible HTTP API, with
continuous batching.

    python -m fr_jax.serve                    # the bundled toy world on http://127.0.0.1:8000
    python -m fr_jax.serve --config=configs/llama3.py --config.router.path=/ckpt/router \\
        --config.experts.paths=/ckpt/math,/ckpt/code --port=8080 --slots=16

Same config and lineup as `python -m fr_jax.decode` (decode.mode, chunk, lazy experts, mesh;
decode.temperature / top_k / top_p are a request's defaults). Starts listening at once;
/health answers 503 until every program is compiled, then 200. SIGTERM (or Ctrl-C) stops
admission, lets in-flight requests finish for up to serve.drain_s seconds and exits 0.
Endpoints, the `fr_jax` extension field, metrics and limits: docs/serving.md.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

import jax

from fr_jax import cli
from fr_jax.corpus import encode_prompt
from fr_jax.inference.lineup import lineup_from_config
from fr_jax.inference.sampling import Sampling
from fr_jax.inference.speculative import speculation_off
from fr_jax.routing.modes import Mode
from fr_jax.runtime.errors import ConfigError, FrJaxError
from fr_jax.serving.api import Service, make_app
from fr_jax.serving.metrics import Metrics
from fr_jax.serving.spec_engine import make_engine
from fr_jax.serving.worker import Worker

COMMAND = cli.Command("serve", "tiny.py", (
    cli.Flag("host", "serve.host", "address to bind"),
    cli.Flag("port", "serve.port", "TCP port (0 = any free one)", "integer"),
    cli.Flag("slots", "serve.slots", "requests decoded at once", "integer"),
    cli.Flag("mode", "decode.mode", "decode mode"),
),
    sections=("serve", "router", "experts"), doc="docs/serving.md")

LONGEST_DEFAULT_CACHE = 4096
API_KEY_ENV = "FR_JAX_API_KEY"


def build_service(config) -> Service:
    """The lineup, engine, worker and app state the config describes (not started)."""
    cli.use_bundled_world(config)
    d, s = config.decode, config.serve
    mode = Mode.parse(d.mode, len(config.experts.paths) or None)
    lineup = lineup_from_config(config, [mode.name])
    defaults = Sampling(d.temperature, d.top_k, d.top_p)
    decoder, params = lineup.decoder(mode.name, defaults, d.chunk)
    cache_len = s.cache_len or min(lineup.max_positions or LONGEST_DEFAULT_CACHE,
                                   LONGEST_DEFAULT_CACHE)
    if cache_len <= decoder.chunk:
        raise ConfigError(f"serve.cache_len={cache_len} leaves no room for a prompt and a "
                          f"chunk of {decoder.chunk} tokens; raise it")
    engine = make_engine(decoder, params, s.slots, cache_len, lineup.eos_ids, lineup.pad_id,
                         tuple(s.buckets) or None)
    names = [mode.model] if mode.standalone else list(lineup.expert_names)
    metrics = Metrics()
    tok = lineup.tokenizer
    return Service(
        worker=Worker(engine, metrics, s.max_queue, names),
        encode=lambda prompt, chat: encode_prompt(tok, prompt, chat),
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        model=s.name or mode.name, expert_names=names, limits=s, defaults=defaults,
        vocab=len(tok), api_key=s.api_key or os.environ.get(API_KEY_ENV, ""),
        metrics=metrics)


def speculative_steps(engine) -> str:
    """'speculative (k=4) ' for an engine whose steps draft (decode.speculate), else ''."""
    k = getattr(engine, "speculate", 0)
    return f"speculative (k={k}) " if k else ""


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: a free one), bound before the models load so a port in
    use is reported at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; pick another "
                          "--port (or --port=0 for any free one)") from None
    sock.listen(2048)
    return sock


def serve(config, fv=None):
    import uvicorn  # the HTTP stack loads only for the command that serves

    s = config.serve
    sock = bind(s.host, s.port)
    host, port = sock.getsockname()[:2]
    service = build_service(config)
    engine, worker = service.engine, service.worker
    url = f"http://{host if ':' not in host else '[' + host + ']'}:{port}"
    print(f"serving '{service.model}' (experts: {', '.join(service.expert_names)}) on "
          f"{jax.devices()[0].platform}: {engine.slots} slots x {engine.cache_len} cache "
          f"slots; {engine.programs} programs to compile (prefill buckets "
          f"{', '.join(map(str, engine.buckets))}; insert; a chunk of {engine.chunk} "
          f"{speculative_steps(engine)}steps)", flush=True)
    if config.decode.speculate and not speculative_steps(engine):
        print(speculation_off(config.decode.mode), flush=True)
    if host not in ("127.0.0.1", "::1", "localhost") and not service.api_key:
        print(f"warning: listening on {host} with no API key: anyone who reaches this "
              f"machine can use it (set serve.api_key or {API_KEY_ENV})", file=sys.stderr)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Stop admitting, let uvicorn drain; not re-raised afterwards (exit status 0).
            service.draining = True
            self.force_exit = self.should_exit
            self.should_exit = True

    def announce():
        worker.warmed.wait()
        if worker.failed is not None:  # nothing can be served: stop the HTTP side too
            server.should_exit = True
            return
        print(f"ready in {worker.warm_up_s:.1f} s: {url}/v1 (model '{service.model}')",
              flush=True)

    server = Server(uvicorn.Config(make_app(service), log_level="warning", access_log=False,
                                   timeout_graceful_shutdown=s.drain_s, lifespan="off"))
    worker.start()
    threading.Thread(target=announce, daemon=True).start()
    print(f"listening on {url} (/health is 503 until ready)", flush=True)
    server.run(sockets=[sock])
    worker.stop()
    if worker.failed is not None:
        e = worker.failed
        raise FrJaxError(f"compiling the server's programs failed: {type(e).__name__}: {e}")
    print(f"stopped: {worker.tokens} tokens generated", flush=True)
    return 0


def main(argv=None):
    return cli.main(COMMAND, serve, argv)


if __name__ == "__main__":
    main()
