"""Stop-string matching: StopMatcher against a naive reference, its work bound with a very long
stop string, and `RowText` streaming through the real tokenizer."""

from __future__ import annotations

import random

from xgen.generate.engine import RowText
from xgen.generate.stops import StopMatcher
from xgen.tokenizer import Tokenizer

TOK = Tokenizer.xgen()


def _naive_feed(text: str, previous: int, stops: list[str]) -> int | None:
    """Smallest start of an occurrence that ends after `previous` (i.e. in the new characters)."""
    starts = [
        i for s in stops if s for i in range(max(0, previous - len(s) + 1), len(text) - len(s) + 1) if text.startswith(s, i)
    ]
    return min(starts, default=None)


def _naive_hold(text: str, stops: list[str]) -> int:
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def test_matches_naive_reference():
    rng = random.Random(1234)
    for _ in range(300):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.1:
            stops.append("")  # ignored
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, 8)))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        matcher, fed = StopMatcher(stops), ""
        for chunk in chunks:
            previous, fed = len(fed), fed + chunk
            got = matcher.feed(chunk)
            assert got == _naive_feed(fed, previous, stops), (stops, chunks, fed)
            if got is not None:
                break
            assert matcher.hold == _naive_hold(fed, stops), (stops, chunks, fed)
            assert matcher.table_entries <= len(fed) * len(stops)


def test_long_stop_costs_only_the_text_fed():
    rng = random.Random(7)
    long_stop = "".join(rng.choice("xyz") for _ in range(1_000_000))
    # Text that follows the stop for 6,000 characters, then leaves it.
    text = long_stop[:6000] + "w" + long_stop[:3999]
    matcher = StopMatcher([long_stop])
    for i in range(0, len(text), 7):
        assert matcher.feed(text[i : i + 7]) is None
        assert matcher.table_entries <= min(i + 7, len(text))
    assert matcher.hold == 3999
    assert matcher.table_entries <= 6000

    # Text that never starts the stop builds no table at all.
    matcher = StopMatcher([long_stop])
    assert matcher.feed("w" * 10_000) is None
    assert matcher.hold == 0 and matcher.table_entries == 0

    # Alongside the long stop, a short stop that really occurs is found where it starts.
    matcher = StopMatcher([long_stop, "STOP"])
    assert matcher.feed(long_stop[:5000]) is None
    assert matcher.hold == 5000
    assert matcher.feed("ST") is None
    assert matcher.feed("OP and more") == 5000
    assert matcher.table_entries <= 5000 + 13


def test_long_stop_that_occurs():
    rng = random.Random(8)
    stop = "".join(rng.choice("xy") for _ in range(20_000))
    text = stop[:12_345] + "z" + stop + "tail"
    matcher = StopMatcher([stop])
    found = [r for i in range(0, len(text), 100) if (r := matcher.feed(text[i : i + 100])) is not None]
    assert found[0] == 12_346 == text.find(stop)
    assert matcher.table_entries <= len(stop)


def _stream(text: str, stops: list[str]) -> tuple[list[str], bool, RowText]:
    row, deltas, stopped = RowText(TOK, stops), [], False
    for token in TOK.encode_ordinary(text):
        delta, stopped = row.add(token)
        deltas.append(delta)
        if stopped:
            break
    deltas.append(row.flush())
    return deltas, stopped, row


def test_rowtext_cuts_stop_split_across_tokens():
    text = "Hello world, the end. More words"
    stop = " the end"
    assert len(TOK.encode_ordinary(stop)) > 1
    deltas, stopped, row = _stream(text, [stop])
    assert stopped
    assert "".join(deltas) == row.text == "Hello world,"
    assert TOK.decode(row.tokens_before_stop()) == "Hello world,"


def test_rowtext_streams_held_back_text_that_is_not_a_stop():
    text = "Hello world, the end. More words"
    row, seen = RowText(TOK, [" the beginning", "words!"]), []
    for token in TOK.encode_ordinary(text):
        delta, stopped = row.add(token)
        assert not stopped
        seen.append(delta)
        streamed = "".join(seen)
        assert row.text.startswith(streamed)
        if row.text.endswith(" the"):
            assert streamed == "Hello world,"  # " the" might begin " the beginning"
        if row.text.endswith(" the end"):
            assert streamed == "Hello world, the end"
    assert "".join(seen) == "Hello world, the end. More "  # "words" might begin "words!"
    assert row.flush() == "words"


def test_rowtext_deltas_concatenate_with_multibyte_text():
    text = "naïve café → 東京 emoji 🙂🙂 then STOP here"
    deltas, stopped, row = _stream(text, ["STOP", "🙂x"])
    assert stopped
    assert "".join(deltas) == row.text == text[: text.index("STOP")]
    deltas, stopped, row = _stream(text, ["absent"])
    assert not stopped and "".join(deltas) == row.text == text


def test_rowtext_with_megabyte_stop():
    stop = "Z" * 1_000_000
    deltas, stopped, row = _stream("Hello ZZZ", [stop])
    assert not stopped and "".join(deltas) == "Hello ZZZ"
    assert row.matcher.table_entries <= len("Hello ZZZ")
