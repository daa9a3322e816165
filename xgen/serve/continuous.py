"""The continuous scheduler: rows join and leave the running batch at every decoding step.

The worker keeps a `SlotCache` of `max_batch` slots. Each step it
1. admits queued rows into free slots, round-robin over requests (`Scheduler.take`), so a
   request of many prompts shares the slots with the others instead of going first;
2. runs one prefill call of `prefill_chunk` prompt tokens: one piece of that length for a
   single row still entering, or a quarter of it for each of up to 4 such rows (oldest
   first). A long prompt enters over several steps, and the rows already decoding wait at
   most one such call per step (chunked prefill);
3. runs one decoding step for every slot and hands each decoding row its token: streamed
   text, end-of-text, stop strings and `max_tokens` retire a row at once, and its slot
   is free for the next step;
4. scores, in one `engine.score` call, the rows whose echoed text needs log-probabilities
   (after they finish generating, or at once when they generate nothing).

Before admitting, it makes room for requests that wait (`_make_room`): rows of a paused
job (its stream's client is not reading) stop computing but keep their slot until a waiting
request needs it, and a request holding more than its share (`share_rows`) gives up its
least advanced row to a waiting request holding less. A row taken out of its slot keeps its
tokens (`Row.progress`) and resumes by prefilling its prompt again and feeding its tokens
back one per decoding step, each the same program, position and sampler step as the first
time (a resampled token that differs is counted as `replay_mismatches` and the one already
sent is kept), so a preempted row still ends with the tokens of generating it alone.

A row's tokens are those of `Engine.generate` for that prompt alone: its slot holds only
its own keys and values, its positions start at 0, and its sampler folds its own seed with
its own step (tests/serve/test_continuous.py checks the greedy tokens are identical).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field

import numpy as np

from xgen.generate import Completion
from xgen.generate.engine import RowText
from xgen.generate.slots import SlotCache
from xgen.serve.jobs import Row, ServerError
from xgen.serve.scheduling import Scheduler, padded_to_power_of_two

log = logging.getLogger(__name__)

PREFILL_PIECES = 4  # rows whose prompts advance in one prefill call


@dataclass(eq=False)
class _Active:
    """A row in a slot: how much of its prompt is in the cache, and what it generated."""

    row: Row
    text: RowText
    completion: Completion
    prefilled: int = 0  # prompt tokens in the cache
    token: int = -1  # the last sampled token, not yet in the cache (-1: still prefilling)
    forced: list[int] = field(default_factory=list)  # resuming: its tokens still to feed back, in order

    @property
    def length(self) -> int:
        """Tokens in the cache: the whole prompt, then one more per decoding step."""
        if self.token < 0:
            return self.prefilled
        return self.prefilled + self.step - 1

    @property
    def step(self) -> int:
        """The sampler's step of the token it samples next (tokens accepted so far)."""
        return len(self.completion.token_logprobs) - len(self.forced)

    def leave_slot(self) -> None:
        """Forget the cache: on its return it prefills its prompt again, then feeds back the
        tokens it had accepted (its text, logprobs and stream position stay as they are)."""
        self.forced = list(self.text.ids)  # every token it accepted (none while first prefilling)
        self.prefilled, self.token = 0, -1


class ContinuousBatcher(Scheduler):
    kind = "continuous"

    def __init__(self, engine, max_batch: int = 8, *, prefill_chunk: int = 128, max_queued_rows: int = 4096,
                 max_request_share: float = 0.5):  # fmt: skip
        self.prefill_chunk = prefill_chunk
        self.cache: SlotCache | None = None
        super().__init__(engine, max_batch, max_queued_rows, max_request_share)
        self.count(steps=0, prefill_calls=0, score_calls=0, failed_steps=0, preempted_rows=0, replayed_tokens=0,
                   replay_mismatches=0)  # fmt: skip

    def _loop(self) -> None:
        self.cache = cache = SlotCache(self.engine, self.max_batch, self.prefill_chunk, PREFILL_PIECES)
        slots: list[_Active | None] = [None] * cache.rows
        sampling = dict(
            seeds=np.zeros(cache.rows, np.uint32), temperature=np.zeros(cache.rows, np.float32),
            top_k=np.zeros(cache.rows, np.int32), top_p=np.ones(cache.rows, np.float32),
        )  # fmt: skip
        to_score: list[Row] = []
        while self.wait_for_work():
            for i, a in enumerate(slots):
                if a is not None and (a.row.job.cancelled or a.row.job.finished):
                    slots[i] = None  # the client went away, or another row of its request failed
                    self.finished(a.row)
            self._make_room(slots)
            free = [i for i, s in enumerate(slots) if s is None]
            held = collections.Counter(a.row.job for a in slots if a is not None)
            for row in self.take(len(free), held=held):
                if row.settings.max_new_tokens == 0:
                    to_score.append(row)
                    continue
                i = free.pop(0)
                a, row.progress = row.progress, None
                if a is None:
                    a = _Active(row, RowText(self.engine.tokenizer, row.settings.stop), Completion(list(row.prompt)))
                slots[i] = a
                s = row.settings
                sampling["seeds"][i], sampling["temperature"][i] = s.seed, s.temperature
                sampling["top_k"][i], sampling["top_p"][i] = s.top_k, s.top_p
            try:
                self._prefill(cache, slots, sampling, to_score)
                self._decode(cache, slots, sampling, to_score)
                if to_score:
                    batch, to_score = to_score[: self.max_batch], to_score[self.max_batch :]
                    self._score(batch)
            except Exception as ex:  # noqa: BLE001 - a failed step fails its rows, never the worker
                log.exception("a decoding step failed")
                self.count(failed_steps=1)
                error = ServerError(f"the model failed on this step: {type(ex).__name__}: {ex}")
                for row in [a.row for a in slots if a is not None] + to_score:
                    self.finished(row, error)
                slots, to_score = [None] * cache.rows, []
                cache.reset()

    def _make_room(self, slots: list) -> None:
        """Free slots for waiting requests (one per waiting request and step): first those of
        paused jobs' rows, then, for a request under its share, the least advanced row of the
        request holding the most beyond its share. Each goes back to its queue (put_back)."""
        waiting = self.waiting_jobs()
        free = sum(a is None for a in slots)
        if len(waiting) <= free:
            return
        held = collections.Counter(a.row.job for a in slots if a is not None)
        share = self.share_rows
        paused = sorted((i for i, a in enumerate(slots) if a is not None and a.row.job.paused), key=lambda i: slots[i].length)
        out = paused[: len(waiting) - free]
        for i in out:
            held[slots[i].row.job] -= 1
        want = sum(held[job] < share for job in waiting) - free - len(out)
        while want > 0:
            job, n = max(held.items(), key=lambda jn: jn[1], default=(None, 0))
            if n <= share:
                break
            # Least advanced by tokens generated (a row still replaying has a short cache but
            # its tokens: ranked by cache length it would be preempted again and again).
            i = min((i for i, a in enumerate(slots) if a is not None and a.row.job is job and i not in out),
                    key=lambda i: (len(slots[i].completion.token_logprobs), slots[i].prefilled))  # fmt: skip
            out.append(i)
            held[job] -= 1
            want -= 1
        for i in out:
            a, slots[i] = slots[i], None
            a.leave_slot()
            a.row.progress = a
            self.put_back(a.row)
        if out:
            self.count(preempted_rows=len(out))

    def _arrays(self, sampling: dict, index, steps) -> tuple:
        return (sampling["seeds"][index], np.asarray(steps, np.int32), sampling["temperature"][index],
                sampling["top_k"][index], sampling["top_p"][index])  # fmt: skip

    def _prefill(self, cache: SlotCache, slots: list, sampling: dict, to_score: list) -> None:
        entering = [(i, a) for i, a in enumerate(slots) if a is not None and a.token < 0 and not a.row.job.paused]
        entering = sorted(entering, key=lambda ia: ia[1].prefilled)[: cache.pieces]  # oldest (furthest along) first
        if not entering:
            return
        width = cache.piece_length([a.prefilled for _, a in entering])
        pieces = [(i, a.prefilled, a.row.prompt[a.prefilled : a.prefilled + width]) for i, a in entering]
        index = np.array([i for i, _ in entering])
        sampled = cache.prefill(pieces, self._arrays(sampling, index, np.zeros(len(index))))
        self.count(prefill_calls=1)
        for n, (i, a) in enumerate(entering):
            a.prefilled += len(pieces[n][2])
            if a.prefilled == len(a.row.prompt):  # the prompt is in: its first token was sampled
                self._accept(slots, i, sampled, n, to_score)

    def _decode(self, cache: SlotCache, slots: list, sampling: dict, to_score: list) -> None:
        decoding = [i for i, a in enumerate(slots) if a is not None and a.token >= 0 and not a.row.job.paused]
        if not decoding:
            return
        tokens, lengths, steps = (np.zeros(cache.rows, np.int32) for _ in range(3))
        for i, a in enumerate(slots):
            # Every slot writes its step's keys and values at its length: for a row still
            # entering, that is where its next prompt piece goes (and overwrites them).
            if a is not None:
                lengths[i] = a.length
        for i in decoding:
            a = slots[i]
            tokens[i], steps[i] = a.token, a.step
        sampled = cache.decode(tokens, lengths, self._arrays(sampling, slice(None), steps))
        self.count(steps=1)
        for i in decoding:
            self._accept(slots, i, sampled, i, to_score)

    def _accept(self, slots: list, i: int, sampled: tuple, n: int, to_score: list) -> None:
        """Hand slot i its sampled token (entry n of `sampled`); retire the row when done."""
        ids, lp, top_ids, top_lp = sampled
        a = slots[i]
        row, c, token = a.row, a.completion, int(ids[n])
        if a.forced:  # resuming: this token was accepted (and sent) before the row left its slot
            a.token = a.forced.pop(0)
            self.count(replayed_tokens=1, replay_mismatches=int(token != a.token))
            if token != a.token:
                log.warning("a resumed row sampled another token than before it left its slot; it keeps the one it had")
            return
        self.produced(1)
        done = False
        if token == self.engine.tokenizer.eos_id:
            c.finish_reason, c.eos, done = "stop", True, True
        else:
            delta, stopped = a.text.add(token)
            c.token_logprobs.append(float(lp[n]))
            if row.top_logprobs:
                k = row.top_logprobs
                c.top_logprobs.append({int(t): float(v) for t, v in zip(top_ids[n][:k], top_lp[n][:k])})
            if delta:
                row.job.text(row.index, delta)
            if stopped:
                c.finish_reason, done = "stop", True
            elif len(a.text.ids) >= row.settings.max_new_tokens:
                done = True
        a.token = token
        if not done:
            return
        slots[i] = None
        rest = a.text.flush()
        if rest:
            row.job.text(row.index, rest)
        c.text = a.text.text
        c.tokens = a.text.tokens_before_stop() if c.finish_reason == "stop" else list(a.text.ids)
        c.token_logprobs, c.top_logprobs = c.token_logprobs[: len(c.tokens)], c.top_logprobs[: len(c.tokens)]
        row.completion = c
        if row.score:
            to_score.append(row)
        else:
            self.finished(row)

    def _score(self, rows: list[Row]) -> None:
        eos = self.engine.tokenizer.eos_id
        sequences = padded_to_power_of_two([r.sequence(eos) for r in rows], [eos], self.max_batch)
        top = max(r.top_logprobs for r in rows)
        for row, scored in zip(rows, self.engine.score(sequences, top_logprobs=top)):
            row.scored = scored
        self.count(score_calls=1)
        for row in rows:
            self.finished(row)
