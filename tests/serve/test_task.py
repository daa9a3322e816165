"""`python -m xgen.run task=serve`: loads the checkpoint, logs its URL, answers, and exits
cleanly on SIGTERM."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.serve.conftest import Client
from xgen.generate import SamplingConfig

REPO = Path(__file__).resolve().parents[2]


def test_serve_task_answers_and_stops_on_sigterm(tmp_path, tiny_model, engine):
    from xgen.hf.io import save

    hf_dir = save(tmp_path / "hf", *tiny_model)
    proc = subprocess.Popen(
        [sys.executable, "-m", "xgen.run", "task=serve", f"checkpoint={hf_dir}", "serve.port=0",
         "serve.model_name=tiny-hf", "generate.max_len=512", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output, url, deadline = [], None, time.monotonic() + 120
    try:
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            if m := re.search(r"serving tiny-hf .* at (http://[\d.]+:\d+)/v1", output[-1]):
                url = m.group(1)
        assert url, "".join(output)[-3000:]
        status, out = Client(url).post("/v1/completions", {"prompt": "Hello there", "max_tokens": 6, "temperature": 0})
        assert status == 200 and out["model"] == "tiny-hf"
        ids = engine.tokenizer.encode("Hello there")
        assert out["choices"][0]["text"] == engine.generate([ids], SamplingConfig(max_new_tokens=6))[0].text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.2)
    while not lines.empty():
        output.append(lines.get())
    assert "shutting down" in "".join(output)
