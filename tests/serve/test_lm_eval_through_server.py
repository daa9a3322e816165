"""lm-evaluation-harness's `local-completions` model against `task=serve` gives the same
per-request log-likelihoods as `eval=zeroshot` on the same model and items (issue 33: the server
normalized over the tokenizer's 50,313 ids, eval=zeroshot and lm-eval's hf backend over the
head's 51,200 rows, and lm-eval's numbers through the server were off by up to 0.23).

The model is random with large weights (init_std 0.5), so its padding rows carry real
probability mass and the two normalizations differ by far more than the tolerance."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import compose_config
from tests.serve.conftest import Client

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")  # lm-eval's tokenizer for `tokenized_requests` (the export's tokenizer.json)

# xgen task -> its lm-eval task: multi-token continuations (hellaswag), 4 choices and 3 (arc), 2 (piqa)
TASKS = {"arc_challenge": "xgen_arc_challenge", "piqa": "xgen_piqa", "hellaswag": "xgen_hellaswag"}
LIMIT = 2  # items per task
MAX_LEN = 512


class _URL(logging.Handler):
    """The URL task=serve logs once it listens (serve.port=0: any free port)."""

    def __init__(self):
        super().__init__()
        self.url: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if m := re.search(r" at (http://[\d.]+:\d+)/v1", record.getMessage()):
            self.url = m.group(1)


@pytest.fixture(scope="module")
def hf_dir(tiny_model, tmp_path_factory) -> Path:
    from xgen.hf.io import save

    return save(tmp_path_factory.mktemp("lm_eval_model") / "hf", *tiny_model)


@pytest.fixture(scope="module")
def serving(hf_dir, tmp_path_factory):
    """`task=serve checkpoint=<hf_dir>` as the command runs it (its defaults), in a thread."""
    from xgen.tasks import serve

    cfg = compose_config("task=serve", f"checkpoint={hf_dir}", "serve.port=0", f"generate.max_len={MAX_LEN}")
    stop, found, logger = threading.Event(), _URL(), logging.getLogger(serve.__name__)
    level = logger.level
    logger.addHandler(found)
    logger.setLevel(logging.INFO)
    errors: list[BaseException] = []

    def run():
        try:
            serve.run(cfg, tmp_path_factory.mktemp("serve_run"), stop)
        except BaseException as ex:  # noqa: BLE001 - reported by the fixture
            errors.append(ex)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 300
    try:
        while found.url is None:
            assert thread.is_alive(), f"task=serve stopped: {errors}"
            assert time.monotonic() < deadline, "task=serve logged no URL"
            time.sleep(0.05)
        yield found.url
    finally:
        stop.set()
        thread.join(timeout=120)
        logger.removeHandler(found)
        logger.setLevel(level)
    assert not errors, errors


def test_lm_eval_local_completions_through_the_server_equals_eval_zeroshot(serving, hf_dir, tmp_path, monkeypatch):
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    from tests.eval.test_lm_eval_parity import task_yamls
    from xgen.eval.fixtures.zeroshot import write as write_zeroshot
    from xgen.tasks import run_task

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    data = write_zeroshot(tmp_path / "data")

    (tmp_path / "xgen_eval").mkdir()
    ours = run_task(
        compose_config("task=eval", "eval=zeroshot", f"checkpoint={hf_dir}", f"data_dir={tmp_path / 'data'}",
                       f"eval.limit={LIMIT}", f"eval.tasks=[{','.join(TASKS)}]", f"generate.max_len={MAX_LEN}"),
        tmp_path / "xgen_eval",
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "xgen_eval" / "zeroshot_partial.jsonl").read_text().splitlines()]
    xgen_lls = {r["_id"]: r["result"]["lls"] for r in records}

    task_yamls(tmp_path / "lm_eval_tasks", data)
    model_args = (f"model=xgen,base_url={serving}/v1/completions,tokenizer={hf_dir},tokenizer_backend=huggingface,"
                  f"tokenized_requests=True,max_length={MAX_LEN}")  # docs/serving.md's, one request at a time
    theirs = simple_evaluate(
        model="local-completions", model_args=model_args, tasks=list(TASKS.values()), limit=LIMIT,
        task_manager=TaskManager(include_path=str(tmp_path / "lm_eval_tasks")), log_samples=True,
    )  # fmt: skip

    compared = 0
    for xgen_task, name in TASKS.items():
        samples = theirs["samples"][name]
        assert sorted(s["doc_id"] for s in samples) == list(range(LIMIT))
        for s in samples:
            lls = [float(r[0][0]) for r in s["resps"]]
            assert xgen_lls[f"{xgen_task}/{s['doc_id']}"] == pytest.approx(lls, abs=1e-4), (name, s["doc_id"])
            compared += len(lls)
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in theirs["results"][name]:
                assert ours["tasks"][xgen_task][metric] == theirs["results"][name][f"{metric},none"], (name, metric)
    assert len(xgen_lls) == LIMIT * len(TASKS) and compared == sum(map(len, xgen_lls.values())) > 10


def test_a_tokens_logprob_is_the_same_number_generated_or_echoed_and_says_its_normalization(serving):
    """The server's sampled tokens' log-probs use the normalization its scores use (the
    response and /v1/models say which), and sampling still never draws a padding row."""
    client = Client(serving)
    status, models = client.request("GET", "/v1/models")
    assert status == 200 and models["data"][0]["logprobs_normalized_over"] == "output_rows"
    assert models["data"][0]["logprobs_normalized_ids"] == 51200
    body = {"prompt": "The quick brown fox", "max_tokens": 8, "temperature": 0, "logprobs": 5}
    status, generated = client.post("/v1/completions", body)
    assert status == 200, generated
    status, echoed = client.post("/v1/completions", {**body, "echo": True})
    assert status == 200, echoed
    gen, echo = generated["choices"][0]["logprobs"], echoed["choices"][0]["logprobs"]
    assert gen["normalized_over"] == echo["normalized_over"] == "output_rows"
    p, n = echoed["usage"]["prompt_tokens"], len(gen["tokens"])  # an echo that ended on end-of-text has it too
    assert n and echo["tokens"][p : p + n] == gen["tokens"]
    assert echo["token_logprobs"][p : p + n] == pytest.approx(gen["token_logprobs"], abs=1e-4)
    for g, e in zip(gen["top_logprobs"], echo["top_logprobs"][p : p + n]):
        assert list(g) == list(e) and list(g.values()) == pytest.approx(list(e.values()), abs=1e-4)
    assert not any(t.startswith("<|pad:") for t in gen["tokens"])  # greedy over the tokenizer's ids only
    # Sampled at temperature 1 from the random model: still never a padding row.
    status, sampled = client.post("/v1/completions", {**body, "temperature": 1.0, "seed": 3, "n": 4, "max_tokens": 16})
    assert status == 200 and not any(t.startswith("<|pad:") for c in sampled["choices"] for t in c["logprobs"]["tokens"])
