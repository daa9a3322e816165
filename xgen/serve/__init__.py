"""An OpenAI-compatible HTTP server for an xgen model (`task=serve`): /v1/completions
(with echo and logprobs, what lm-evaluation-harness's `local-completions` needs),
/v1/chat/completions (the config's chat template), streaming, /health and /metrics, on
Starlette and uvicorn (server.py, app.py), in front of a scheduler that batches concurrent
requests into shared Engine calls (scheduling.py: continuous.py or batcher.py)."""

from xgen.serve.batcher import Batcher
from xgen.serve.jobs import Job, Row, ServerError
from xgen.serve.protocol import RequestError
from xgen.serve.server import XGenServer, make_server

__all__ = ["Batcher", "Job", "RequestError", "Row", "ServerError", "XGenServer", "make_server"]
