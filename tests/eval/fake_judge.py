"""A fake OpenAI-compatible judge on localhost for the judged-benchmark tests.

It reads the answer(s) out of the grading request and replies with a verdict that follows
from them, so a test can recompute every score from the answers file:
- longform_qa: Coherence len % 4, Relevance (len // 2) % 4, Accuracy (len // 3) % 4
- mt_bench: Rating [[len % 10 + 1]] of the graded answer (the second one in a conversation)
- pairwise: the longer answer wins ([[A]] / [[B]]), equal lengths tie ([[C]])
A request whose user message contains `malformed_if` gets a reply with no verdict in it;
the first `fail_first` requests get HTTP 503. Replies name `served_model` as their model, as
a real endpoint names the model that answered.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def between(text: str, start: str, end: str, last: bool = False) -> str:
    i = text.rindex(start) if last else text.index(start)
    i += len(start)
    return text[i : text.index(end, i)]


def longform_scores(answer: str) -> tuple[int, int, int]:
    n = len(answer)
    return n % 4, (n // 2) % 4, (n // 3) % 4


def rating(answer: str) -> int:
    return len(answer) % 10 + 1


def pair_verdict(a: str, b: str) -> str:
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"


def verdict_for(user: str) -> str:
    if "Coherence: #" in user:
        c, r, a = longform_scores(between(user, "[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]"))
        return f"The answer is graded below.\nCoherence: {c}\nRelevance: {r}\nAccuracy: {a}"
    if "[The Start of Assistant A's Answer]" in user:
        a = between(user, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]")
        b = between(user, "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's Answer]")
        return f"Comparing both. [[{pair_verdict(a, b)}]]"
    if "### Assistant A:" in user:
        answer = between(user, "### Assistant A:\n", "\n\n<|The End of Assistant A's Conversation", last=True)
    else:
        answer = between(user, "[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]")
    return f"Short explanation. Rating: [[{rating(answer)}]]"


class FakeJudge:
    """`with FakeJudge() as judge:` serves `judge.url` (a base_url ending in /v1); `bodies`
    and `headers` hold every request received."""

    def __init__(self, malformed_if: str | None = None, fail_first: int = 0, served_model: str = "fake-judge-1"):
        self.malformed_if, self.fail_first, self.served_model = malformed_if, fail_first, served_model
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with judge.lock:
                    judge.bodies.append(body)
                    judge.headers.append(dict(self.headers))
                    n = len(judge.bodies)
                if self.path != "/v1/chat/completions":
                    return self._reply(404, {"error": "not found"})
                if n <= judge.fail_first:
                    return self._reply(503, {"error": "overloaded"})
                user = body["messages"][-1]["content"]
                text = "I cannot decide." if judge.malformed_if and judge.malformed_if in user else verdict_for(user)
                choice = {"index": 0, "message": {"role": "assistant", "content": text}}
                self._reply(200, {"model": judge.served_model, "choices": [choice]})

            def _reply(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeJudge":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
