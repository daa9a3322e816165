"""The chat template as tokens and a loss mask, packing, and the masked loss itself."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from xgen.config import ChatTemplateConfig, ModelConfig
from xgen.generate.chat import render_prompt, turn_text
from xgen.model.loss import loss_fn
from xgen.model.transformer import XGenModel
from xgen.sft.formats import Conversation, Turn
from xgen.sft.packing import pack, to_model_batch
from xgen.sft.render import render
from xgen.tokenizer import Tokenizer
from xgen.tokenizer.xgen import STARCODER_SPECIALS

TOK = Tokenizer.xgen()
TEMPLATE = ChatTemplateConfig()
CONV = Conversation(
    turns=(
        Turn("user", "What colour is the zorblat?"),
        Turn("assistant", "The zorblat is teal."),
        Turn("user", "And the quimble?"),
        Turn("assistant", "Mauve, always."),
    )
)


def test_only_assistant_words_and_their_end_of_text_are_trained():
    ids, mask = render(CONV, TEMPLATE, TOK)
    assert len(ids) == len(mask)
    trained = TOK.decode(ids[mask == 1])
    assert trained == " The zorblat is teal.<|endoftext|> Mauve, always.<|endoftext|>"
    # Token by token: the context is exactly the system header, the human turns and the markers.
    context = TOK.decode(ids[mask == 0])
    assert context == (
        TEMPLATE.system + "### Human: What colour is the zorblat?\n### Assistant:"
        "### Human: And the quimble?\n### Assistant:"
    )
    runs = np.flatnonzero(np.diff(np.r_[mask, 0])) + 1  # where the mask switches
    assert [TOK.decode(ids[a:b]) for a, b in zip(runs[::2], runs[1::2])] == [
        " The zorblat is teal.<|endoftext|>",
        " Mauve, always.<|endoftext|>",
    ]
    assert ids[mask == 1][-1] == TOK.eos_id and (ids == TOK.eos_id).sum() == 2


def test_training_tokens_match_what_inference_feeds_the_model():
    """The rendered context before an answer is the token sequence task=chat builds."""
    ids, mask = render(CONV, TEMPLATE, TOK)
    first_answer = int(np.flatnonzero(mask)[0])
    prompt = render_prompt(TEMPLATE, [{"role": "user", "content": CONV.turns[0].content}])
    assert TOK.encode(prompt) == ids[:first_answer].tolist()
    second_answer = int(np.flatnonzero(mask)[np.flatnonzero(np.diff(np.flatnonzero(mask)) > 1)[0] + 1])
    messages = [{"role": t.role, "content": t.content} for t in CONV.turns[:3]]
    assert TOK.encode(render_prompt(TEMPLATE, messages)) == ids[:second_answer].tolist()


def test_a_conversations_own_system_message_replaces_the_header_and_the_header_can_be_off():
    ids, _ = render(Conversation(CONV.turns[:2], system="Be terse."), TEMPLATE, TOK)
    assert TOK.decode(ids).startswith("Be terse.\n\n### Human:")
    ids, _ = render(Conversation(CONV.turns[:2]), TEMPLATE, TOK, system_header=False)
    assert TOK.decode(ids).startswith("### Human:")


def whole_text(conv: Conversation, template: ChatTemplateConfig = TEMPLATE) -> str:
    """The conversation as one text, built from the template's strings independently of render."""
    head = conv.system + "\n\n" if conv.system is not None else template.system
    return head + "".join(turn_text(template, t.role, t.content) for t in conv.turns)


@pytest.mark.parametrize(
    "conv",
    [CONV, Conversation(CONV.turns[:2], system="Be terse."), Conversation(CONV.turns[2:] * 3)],
    ids=["two_turns", "own_system", "six_turns"],
)
def test_without_special_strings_the_ids_are_the_whole_text_encoded_at_once(conv):
    ids, _ = render(conv, TEMPLATE, TOK)
    assert ids.tolist() == TOK.encode(whole_text(conv))


SPECIAL_CONV = Conversation(
    turns=(
        Turn("user", "What do <|endoftext|> and <fim_prefix> mean in <filename>a.py?"),
        Turn("assistant", "<fim_prefix> starts a prefix; <|endoftext|> ends a document."),
        Turn("user", "Show <fim_middle><|endoftext|>"),
        Turn("assistant", "<fim_middle><|endoftext|><reponame>"),
    )
)


def test_special_token_strings_in_the_data_are_plain_text_and_only_the_template_end_is_a_control_token():
    ids, mask = render(SPECIAL_CONV, TEMPLATE, TOK)
    text = whole_text(SPECIAL_CONV)
    assert TOK.decode(ids) == text  # every character comes back
    specials = {TOK.encoding.encode_single_token(s) for s in STARCODER_SPECIALS}
    assert not specials & set(ids.tolist())
    eot = np.flatnonzero(ids == TOK.eos_id)
    last_trained = np.flatnonzero(np.diff(np.r_[mask, 0]) == -1)  # where each answer's run ends
    assert eot.tolist() == last_trained.tolist() and len(eot) == 2  # exactly one per assistant turn
    assert TOK.decode(ids[mask == 1]) == (
        " <fim_prefix> starts a prefix; <|endoftext|> ends a document.<|endoftext|>"
        " <fim_middle><|endoftext|><reponame><|endoftext|>"
    )
    # Between the template's ends, the ids are the pre-training (ordinary) encoding.
    first = int(eot[0])
    first_answer_end = text.index(" ends a document.") + len(" ends a document.")
    assert ids[:first].tolist() == TOK.encode_ordinary(text[:first_answer_end])


def test_a_template_end_that_is_not_a_special_token_is_plain_text_too():
    template = dataclasses.replace(TEMPLATE, end="</s>")
    ids, mask = render(SPECIAL_CONV, template, TOK)
    assert ids.tolist() == TOK.encode_ordinary(whole_text(SPECIAL_CONV, template))
    assert TOK.decode(ids[mask == 1]).endswith("<reponame></s>")


CFG = ModelConfig(name="t", d_model=32, n_layers=2, n_heads=4, d_ff=64, init_std=0.2)


def test_masked_loss_is_the_mean_cross_entropy_of_exactly_the_response_tokens():
    ids, mask = render(CONV, TEMPLATE, TOK)
    rows = pack([(ids, mask)], seq_len=len(ids) + 7, pad_id=TOK.eos_id)
    batch = {k: jnp.asarray(v) for k, v in to_model_batch(rows[np.arange(1)]).items()}
    model = XGenModel(CFG, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    masked = float(loss_fn(params, graphdef, batch))
    logits = model(jnp.asarray(ids[None, :-1]))[0]
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(ids[1:])))
    response_targets = np.flatnonzero(mask[1:])  # target t+1 is a response token
    assert len(response_targets) == mask.sum()
    assert masked == pytest.approx(float(ce[response_targets].mean()), rel=1e-5)


def test_packed_conversations_do_not_see_each_other():
    a = render(Conversation(CONV.turns[:2]), TEMPLATE, TOK, system_header=False)
    b = render(Conversation(CONV.turns[2:]), TEMPLATE, TOK, system_header=False)
    rows = pack([a, b], seq_len=64, pad_id=TOK.eos_id)
    assert len(rows) == 1 and rows.counts["rows"] == 1
    row = rows[0]
    n_a, n_b = len(a[0]), len(b[0])
    assert row["segment_ids"][: n_a].tolist() == [1] * n_a and row["segment_ids"][n_a : n_a + n_b].tolist() == [2] * n_b
    assert row["positions"][n_a] == 0 and (row["segment_ids"][n_a + n_b :] == 0).all()
    batch = to_model_batch(rows[np.arange(1)])
    assert batch["loss_mask"][0, n_a - 1] == 0  # a's last token does not learn to predict b's first
    model = XGenModel(CFG, rngs=nnx.Rngs(0))
    packed = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"]))
    alone = model(jnp.asarray(b[0][None]))
    np.testing.assert_allclose(np.asarray(packed[0, n_a : n_a + n_b]), np.asarray(alone[0]), atol=1e-5)


def test_padding_mode_puts_one_conversation_per_row():
    convs = [render(Conversation(CONV.turns[:2]), TEMPLATE, TOK)] * 3
    assert len(pack(convs, seq_len=512, pad_id=TOK.eos_id, packing="pad")) == 3
    assert len(pack(convs, seq_len=512, pad_id=TOK.eos_id, packing="pack")) == 1


def test_too_long_conversations_are_cut_inside_their_last_turns_and_counted():
    ids, mask = render(CONV, TEMPLATE, TOK)
    first_end = int(np.flatnonzero(ids == TOK.eos_id)[0])
    cut_in_second_question = first_end + 5
    rows = pack([(ids, mask)], seq_len=cut_in_second_question, pad_id=TOK.eos_id)
    assert rows.counts["truncated"] == 1 and len(rows) == 1
    row = rows[0]
    kept = row["tokens"][row["segment_ids"] > 0]
    assert kept[-1] == TOK.eos_id and len(kept) == first_end + 1  # trimmed back to the first answer's end
    # Cut before any answer token: nothing to train on, dropped and counted.
    rows = pack([(ids, mask)], seq_len=int(np.flatnonzero(mask)[0]) - 3, pad_id=TOK.eos_id)
    assert len(rows) == 0 and rows.counts["dropped_no_response"] == 1
