"""task=serve: load `checkpoint` and answer OpenAI-style requests until Ctrl-C or SIGTERM.

The HTTP server (uvicorn) runs its event loop in a background thread and the main thread
waits for a signal, so a signal handler only sets an event; the main thread then closes the
server with `serve.shutdown_grace_s` for what still runs (see XGenServer.close).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from pathlib import Path

from xgen.config import ConfigError, XGenConfig

log = logging.getLogger(__name__)


def _check_address(host: str, port: int) -> None:
    """Fail in one line when the address cannot be listened on (in use, not this host's)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the HTTP server does
            probe.bind((host, port))
    except OSError as ex:
        raise ConfigError(f"serve.host={host} serve.port={port}: cannot listen there ({ex.strerror or ex})") from None


def run(cfg: XGenConfig, run_dir: Path, stop: threading.Event | None = None) -> dict:
    """Serve until `stop` is set (by SIGINT/SIGTERM when run from the command line);
    returns the scheduler's counters."""
    s = cfg.serve
    if cfg.checkpoint is None:
        raise ConfigError("task=serve needs checkpoint=<a run directory, a checkpoint or a Hugging Face directory>")
    for key, value, ok in [
        ("serve.port", s.port, 0 <= s.port < 2**16),
        ("serve.max_batch", s.max_batch, s.max_batch >= 1),
        ("serve.batch_wait_ms", s.batch_wait_ms, s.batch_wait_ms >= 0),
    ]:
        if not ok:
            raise ConfigError(f"{key}={value} is out of range (port 0-65535, max_batch >= 1, batch_wait_ms >= 0)")
    _check_address(s.host, s.port)  # before loading the model, which can take minutes
    from xgen.generate.load import load_engine
    from xgen.serve import make_server

    # Log-probs over every row of the output head, as eval=zeroshot (its default) and
    # lm-evaluation-harness's hf backend compute them: lm-eval's local-completions against
    # this server then gives eval=zeroshot's log-likelihoods (tests/serve/test_lm_eval_through_server.py).
    server = make_server(load_engine(cfg, score_all_rows=True), cfg)
    engine = server.engine
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    server.start()
    log.info("serving %s (max_len %d; log-probs over %s: %d ids) at %s/v1 (Ctrl-C to stop)",
             s.model_name, engine.max_len, server.normalized_over, server.normalized_ids, server.url)  # fmt: skip
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("shutting down (running requests get up to %g s: serve.shutdown_grace_s)", s.shutdown_grace_s)
        server.close(grace_s=s.shutdown_grace_s)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    counters = server.batcher.counters()
    log.info("served %d requests (%d rows, %d generated tokens)", counters["requests"], counters["rows"], counters["generated_tokens"])
    return counters
