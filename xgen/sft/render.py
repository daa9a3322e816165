"""A conversation as token ids and a loss mask, in the chat template that inference uses.

The assistant's words and the end-of-text after each of its turns are trained (mask 1);
the system header, human turns and the template's markers are context (mask 0). The whole
conversation is tokenized as one text, as `task=chat` and the server tokenize a prompt, and
each token is masked by where its first character lies: BPE merges across the template's
pieces (its "\n\n" before "### Human:" is one token in a whole text, two apart), so
tokenizing piece by piece would train on ids that inference never produces.

Only the template's own `end` after each assistant turn is a control token. Special-token
strings inside the data (`<|endoftext|>`, `<fim_prefix>`, ... in a code answer) are plain
text, as in pre-training: read as control tokens, one answer could end itself mid-sentence
or teach the model to emit FIM markers. The text is cut only where the template put `end`,
which is also where whole-text encoding with special tokens cuts it, so the merges are the
same.
"""

from __future__ import annotations

import numpy as np

from xgen.config import ChatTemplateConfig
from xgen.sft.formats import Conversation
from xgen.tokenizer import Tokenizer


def render(
    conv: Conversation, template: ChatTemplateConfig, tokenizer: Tokenizer, *, system_header: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of one conversation, both int32 of the same length."""
    if conv.system is not None:
        parts = [conv.system + "\n\n"]
    else:
        parts = [template.system if system_header else ""]
    trained: list[tuple[int, int]] = []  # character spans of the answers and their ends
    at = len(parts[0])
    for turn in conv.turns:
        if turn.role == "user":
            piece = template.human.format(content=turn.content)
        else:
            answer = " " + turn.content + template.end
            piece = template.assistant_prefix + answer
            trained.append((at + len(template.assistant_prefix), at + len(piece)))
        parts.append(piece)
        at += len(piece)
    ends = [stop - len(template.end) for _, stop in trained]
    ids = tokenizer.encode_with_special_at("".join(parts), template.end, ends)
    _, starts = tokenizer.encoding.decode_with_offsets(ids)
    starts = np.asarray(starts)
    mask = np.zeros(len(ids), np.int32)
    for begin, end in trained:
        mask[(starts >= begin) & (starts < end)] = 1
    return np.asarray(ids, np.int32), mask
