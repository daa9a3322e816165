"""What the judge is asked, and how its verdicts are read, for the three judged benchmarks.

- longform_qa (Tables 11/12): an answer to a question about a long document, graded for
  coherence, relevance and accuracy on 0-3 each (the GPT-4 grading of Salesforce's long-form
  QA study that the report follows); the verdict ends with one `Name: score` line per aspect.
- mt_bench (Tables 9/10): FastChat llm_judge's single-answer grading, 1-10 as `[[n]]`: the
  first turn with the question/answer template, the second with the whole conversation and
  the instruction to grade the second answer; math, reasoning and coding show a reference
  answer (FastChat's `single-math-v1` templates) when there is one.
- alpaca_eval (Table 8): a pairwise verdict, `[[A]]`, `[[B]]` or `[[C]]` for a tie, in the
  layout of FastChat's `pair-v2`.

The layouts (section markers, verdict formats, system/user split) are the published ones;
the instruction sentences are this project's wording. A verdict that cannot be read is
`None`, and callers count those rather than drop them.
"""

from __future__ import annotations

import re

Messages = list[dict[str, str]]

# ---- longform_qa ------------------------------------------------------------------------

ASPECTS = ("coherence", "relevance", "accuracy")
LONGFORM_SYSTEM = "You are a careful and impartial grader of answers to questions about documents."
LONGFORM_INSTRUCTION = (
    "[Instruction]\n"
    "Please act as an impartial judge and grade the answer that an AI assistant gave to a question about the "
    "document below. Grade three aspects, each with a whole number from 0 (worst) to 3 (best):\n"
    "Coherence: the answer is well organised, fluent and easy to follow.\n"
    "Relevance: the answer addresses the question that was asked, without digressions.\n"
    "Accuracy: every claim in the answer is supported by the document.\n"
    "Start with a short explanation and stay objective. Then finish with exactly these three lines, "
    "replacing each # by its score:\n"
    "Coherence: #\nRelevance: #\nAccuracy: #"
)


def longform_messages(document: str, question: str, answer: str, reference: str | None = None) -> Messages:
    """The judge sees the whole document (what accuracy is checked against), the question,
    a reference answer when the data has one, and the model's answer."""
    parts = [LONGFORM_INSTRUCTION, f"[Document]\n{document}", f"[Question]\n{question}"]
    if reference:
        parts.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]")
    parts.append(f"[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]")
    return [{"role": "system", "content": LONGFORM_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


_ASPECT_SCORE = re.compile(r"\b(coherence|relevance|accuracy)\b(?:\s+score)?[\"'*\s]*[:=\-]\s*[\"'*\[\s]*(\d+(?:\.\d+)?)", re.I)


def parse_longform(verdict: str) -> dict[str, float] | None:
    """{aspect: 0..3} from lines like `Coherence: 2`, `**Accuracy**: 3/3` or JSON
    `{"relevance": 1}`; the last mention of each aspect counts (the explanation may name them
    first). None unless all three are there and within 0-3."""
    scores: dict[str, float] = {}
    for name, value in _ASPECT_SCORE.findall(verdict):
        scores[name.lower()] = float(value)
    if set(scores) != set(ASPECTS) or not all(0 <= v <= 3 for v in scores.values()):
        return None
    return {a: scores[a] for a in ASPECTS}


# ---- mt_bench (single-answer grading) ---------------------------------------------------

REFERENCE_CATEGORIES = ("math", "reasoning", "coding")  # FastChat's NEED_REF_CATS
_RATING_RULE = (
    'After your explanation, rate the response on a scale of 1 to 10, writing the rating strictly in this '
    'format: "[[rating]]", for example: "Rating: [[5]]".'
)
SINGLE_SYSTEM = "You are a helpful assistant."
SINGLE_INSTRUCTION = (
    "[Instruction]\n"
    "Please act as an impartial judge and assess the quality of the response an AI assistant gave to the user "
    "question shown below. Weigh how helpful, relevant, accurate, deep and creative it is, and its level of detail. "
    "Start with a short explanation and stay as objective as possible. " + _RATING_RULE
)
SINGLE_REF_INSTRUCTION = (
    "[Instruction]\n"
    "Please act as an impartial judge and assess the quality of the response an AI assistant gave to the user "
    "question shown below. Judge correctness and helpfulness. You are given a reference answer and the "
    "assistant's answer: start by comparing the two, pointing out and correcting any mistakes, and stay as "
    "objective as possible. " + _RATING_RULE
)
MULTI_SYSTEM = (
    "Please act as an impartial judge and assess the quality of the responses an AI assistant gave in the "
    "conversation shown below. Weigh how helpful, relevant, accurate, deep and creative they are, and their level "
    "of detail. Your assessment should be about the assistant's answer to the second user question. Start with a "
    "short explanation and stay as objective as possible. " + _RATING_RULE + "\n\n"
)
MULTI_REF_SYSTEM = (
    "Please act as an impartial judge and assess the quality of the responses an AI assistant gave in the "
    "conversation shown below. Judge correctness and helpfulness. You are given reference answers and the "
    "assistant's answers; your assessment should be about the assistant's answer to the second question. Start "
    "by comparing the assistant's answers with the reference answers, pointing out and correcting any mistakes, "
    "and stay as objective as possible. " + _RATING_RULE + "\n\n"
)


def _conversation(title: str, speaker: str, questions: list[str], answers: list[str]) -> str:
    body = "".join(f"### User:\n{q}\n\n### {speaker}:\n{a}\n\n" for q, a in zip(questions, answers))
    return f"<|The Start of {title}|>\n\n{body}<|The End of {title}|>"


def mt_bench_messages(questions: list[str], answers: list[str], turn: int, reference: list[str] | None = None) -> Messages:
    """The grading request for `turn` (1 or 2) of one MT-Bench question; `reference` (the
    reference answers' turns) switches to the reference templates."""
    if turn == 1:
        parts = [SINGLE_REF_INSTRUCTION if reference else SINGLE_INSTRUCTION, f"[Question]\n{questions[0]}"]
        if reference:
            parts.append(f"[The Start of Reference Answer]\n{reference[0]}\n[The End of Reference Answer]")
        parts.append(f"[The Start of Assistant's Answer]\n{answers[0]}\n[The End of Assistant's Answer]")
        return [{"role": "system", "content": SINGLE_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]
    conversation = _conversation("Assistant A's Conversation with User", "Assistant A", questions[:2], answers[:2])
    if reference:
        ref = _conversation("Reference Answer", "Reference answer", questions[:2], reference[:2])
        conversation = f"{ref}\n\n\n{conversation}"
    return [{"role": "system", "content": MULTI_REF_SYSTEM if reference else MULTI_SYSTEM},
            {"role": "user", "content": conversation}]  # fmt: skip


_DOUBLE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SINGLE = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(verdict: str) -> float | None:
    """The rating in `[[n]]` (else `[n]`, as FastChat falls back), if it is within 1-10."""
    match = _DOUBLE.search(verdict) or _SINGLE.search(verdict)
    if match is None:
        return None
    rating = float(match.group(1))
    return rating if 1 <= rating <= 10 else None


# ---- alpaca_eval (pairwise) -------------------------------------------------------------

PAIR_SYSTEM = (
    "Please act as an impartial judge and compare the responses two AI assistants gave to the user question shown "
    "below. Choose the assistant that follows the user's instructions and answers the question better, weighing "
    "how helpful, relevant, accurate, deep and creative the responses are, and their level of detail. Start by "
    "comparing the two responses with a short explanation. Do not let the order in which the responses appear, "
    "their length, or the assistants' names sway you, and stay as objective as possible. After your explanation, "
    'give your final verdict strictly in this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B '
    'is better, and "[[C]]" for a tie.'
)


def pair_messages(instruction: str, answer_a: str, answer_b: str) -> Messages:
    user = (
        f"[User Question]\n{instruction}\n\n"
        f"[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
        f"[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
    )
    return [{"role": "system", "content": PAIR_SYSTEM}, {"role": "user", "content": user}]


_PAIR = re.compile(r"\[\[([ABC])\]\]")


def parse_pair(verdict: str) -> str | None:
    """"A", "B" or "tie" from the last `[[A]]`/`[[B]]`/`[[C]]` (the final verdict follows any
    quoting of the format in the explanation); None when there is none."""
    found = _PAIR.findall(verdict)
    if not found:
        return None
    return {"A": "A", "B": "B", "C": "tie"}[found[-1]]
