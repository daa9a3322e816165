"""An OpenAI-compatible HTTP server for an xgen model (`task=serve`): /v1/completions
(with echo and logprobs, what lm-evaluation-harness's `local-completions` needs),
/v1/chat/completions (the config's chat template), streaming, and batching of concurrent
requests into shared Engine calls."""

from xgen.serve.batcher import Batcher
from xgen.serve.jobs import Job, Row, ServerError
from xgen.serve.protocol import RequestError
from xgen.serve.server import XGenServer, make_server

__all__ = ["Batcher", "Job", "RequestError", "Row", "ServerError", "XGenServer", "make_server"]
