"""/metrics: the server's counters in Prometheus's text exposition format (version 0.0.4).

Gauges for what waits, runs and is open now; counters (`_total`) for everything else,
described here so that an operator reading /metrics knows what each one counts."""

from __future__ import annotations

import collections
import re

GAUGES = {
    "queued_rows": "Rows waiting for the model.",
    "queued_requests": "Requests with rows waiting for the model.",
    "running_rows": "Rows the model is working on.",
    "max_batch": "Rows the model works on together at most (serve.max_batch).",
    "max_request_rows": "Slots one request keeps while others wait (serve.max_request_share of max_batch).",
    "open_connections": "HTTP connections open now.",
    "max_connections": "HTTP connections kept open at most (serve.max_connections, or what the open-file limit allows).",
}
COUNTERS = {
    "requests": "Requests admitted by the scheduler.",
    "rows": "Rows (one per prompt and choice) finished or failed.",
    "generated_tokens": "Tokens generated.",
    "prompt_tokens": "Prompt tokens of finished rows.",
    "failed_rows": "Rows failed by the model or by shutdown.",
    "rejected_requests": "Requests refused with 429 (queue full) or 503 (shutting down).",
    "dropped_rows": "Queued rows dropped because their request was cancelled (client gone) or failed.",
    "paused_streams": "Streams paused because their client did not read (serve.stream_buffer_chunks).",
    "preempted_rows": "Rows that left their slot unfinished for a waiting request (and resumed later).",
    "replayed_tokens": "Tokens fed back to resumed rows (computed again, not generated).",
    "replay_mismatches": "Resumed rows' tokens that resampled differently (the token already sent is kept).",
    "idle_closed": "Connections closed after serve.idle_timeout_s without a request.",
    "read_timeouts": "Requests answered 408: not all in within serve.read_timeout_s.",
    "stalled_connections": "Connections cut because the client took nothing for serve.stall_timeout_s.",
    "refused_connections": "Connections answered 503 beyond serve.max_connections.",
    "suppressed_log_lines": "Warnings not logged by the rate limit (serve.log_repeat_s).",
}


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def prometheus(counters: dict, responses: collections.Counter) -> str:
    """The scheduler's counters and the HTTP responses in Prometheus's text exposition format
    (version 0.0.4): gauges for what waits and runs now, counters (`_total`) for the rest."""
    lines: list[str] = []

    def metric(name: str, kind: str, about: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {about}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    for key, value in counters.items():
        key = re.sub(r"[^a-zA-Z0-9_]", "_", key)
        if isinstance(value, str):  # e.g. which scheduler: a constant 1 labelled with it
            label = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
            metric(f"xgen_{key}_info", "gauge", f"The server's {key}.", [(f'{{{key}="{label}"}}', 1)])
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        elif key == "tokens_per_s":
            metric("xgen_tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.", [("", value)])
        elif key in GAUGES:
            metric(f"xgen_{key}", "gauge", GAUGES[key], [("", value)])
        else:
            metric(f"xgen_{key}_total", "counter", COUNTERS.get(key, f"The scheduler's {key} count."), [("", value)])
    samples = [(f'{{route="{route}",code="{code}"}}', n) for (route, code), n in sorted(responses.items())]
    metric("xgen_http_responses_total", "counter", "HTTP responses by route and status code.", samples)
    return "\n".join(lines) + "\n"
