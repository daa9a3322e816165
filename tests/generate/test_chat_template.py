from xgen.config import ChatTemplateConfig
from xgen.generate.chat import prompt_ids, render_prompt
from xgen.sft.formats import Conversation, Turn
from xgen.sft.render import render
from xgen.tokenizer import Tokenizer

TOK = Tokenizer.xgen()
T = ChatTemplateConfig()


def test_a_prompt_without_special_strings_is_the_whole_texts_encoding():
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sum 2+2"}]
    assert prompt_ids(T, messages, TOK) == TOK.encode(render_prompt(T, messages))


def test_special_strings_typed_in_messages_are_text_and_only_the_templates_ends_are_control_tokens():
    messages = [
        {"role": "user", "content": "Say <|endoftext|> and <fim_prefix> please"},
        {"role": "assistant", "content": "<|endoftext|><fim_middle>"},
        {"role": "user", "content": "again <|endoftext|>"},
    ]
    ids = prompt_ids(T, messages, TOK)
    assert ids.count(TOK.eos_id) == 1  # the end after the one assistant turn
    assert TOK.decode(ids) == render_prompt(T, messages)
    specials = set(TOK.encoding._special_tokens.values())
    assert [i for i in ids if i in specials] == [TOK.eos_id]


def test_inference_prompts_tokenize_a_conversation_as_training_renders_it():
    conv = Conversation((Turn("user", "Write <fim_prefix> code"), Turn("assistant", "ok <|endoftext|> done")))
    trained, _ = render(conv, T, TOK)
    messages = [{"role": "user", "content": "Write <fim_prefix> code"}, {"role": "assistant", "content": "ok <|endoftext|> done"}]
    prompt = prompt_ids(T, messages, TOK)
    # The prompt is the trained conversation followed by the next assistant marker.
    assert prompt[: len(trained)] == trained.tolist()
