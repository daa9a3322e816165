"""Streaming detection of stop strings in generated text.

Each stop string gets a Knuth-Morris-Pratt automaton whose state is the length of the longest
suffix of the text that is a prefix of the stop string. That state is both what a match needs
and exactly how many characters must be held back from streaming (they might begin a stop).
The failure table is built lazily, only as far as the state has reached, and the state grows by
at most one per character fed, so the work is linear in the generated text however long the
stop strings are: a 1 MB stop string costs nothing until text that long matches it. (vLLM
instead holds back len(longest stop) - 1 characters and searches that window on every token,
which costs the stop's length per token and delays streaming by that much.)
"""

from __future__ import annotations

from typing import Sequence


class _Stop:
    """KMP over one stop string; `fail[i]` is the failure value of `pattern[: i + 1]`."""

    __slots__ = ("pattern", "fail", "state")

    def __init__(self, pattern: str):
        self.pattern, self.fail, self.state = pattern, [], 0

    def _failure(self, i: int) -> int:
        """fail[i], extending the table to it (callers only ask for i < state, so i + 1 <= fed)."""
        s, fail = self.pattern, self.fail
        while len(fail) <= i:
            j = len(fail)
            k = fail[j - 1] if j else 0
            while k and s[j] != s[k]:
                k = fail[k - 1]
            fail.append(k + 1 if j and s[j] == s[k] else 0)
        return fail[i]

    def step(self, c: str) -> bool:
        """Feed one character; True when it completes an occurrence of the pattern."""
        s, q = self.pattern, self.state
        while q and s[q] != c:
            q = self._failure(q - 1)
        if s[q] == c:
            q += 1
        if q == len(s):
            self.state = self._failure(q - 1)
            return True
        self.state = q
        return False


class StopMatcher:
    """Finds the earliest stop string in text fed a piece at a time, and how much of the
    text's tail could still become one."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [_Stop(s) for s in dict.fromkeys(stops) if s]  # empty and repeated stops ignored
        self.fed = 0  # characters fed so far

    def feed(self, new: str) -> int | None:
        """Append `new`; returns the smallest start offset (in all text fed) of the stop-string
        occurrences that end within `new`, or None. After a stop, the matcher need not be fed."""
        best = None
        for stop in self._stops:
            n = len(stop.pattern)
            for i, c in enumerate(new):
                if stop.step(c):
                    start = self.fed + i + 1 - n
                    if best is None or start < best:
                        best = start
        self.fed += len(new)
        return best

    @property
    def hold(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        return max((stop.state for stop in self._stops), default=0)

    @property
    def table_entries(self) -> int:
        """Failure-table entries built so far, over all stop strings (each at most `fed`)."""
        return sum(len(stop.fail) for stop in self._stops)
