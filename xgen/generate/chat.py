"""XGen-Inst's conversation format, rendered from `chat_template` in the config.

One function renders a conversation for inference (ending with the assistant's marker, so
the model writes the next answer); the SFT data path renders the same turns with the same
strings, so training and inference never disagree."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping

from xgen.config import ChatTemplateConfig

if TYPE_CHECKING:
    from xgen.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


def turn_text(template: ChatTemplateConfig, role: str, content: str) -> str:
    """One turn as text; an assistant turn includes its end-of-text."""
    if role == "user":
        return template.human.format(content=content)
    if role == "assistant":
        return f"{template.assistant_prefix} {content}{template.end}"
    raise ValueError(f"role {role!r} is not one of user, assistant")


def _prompt_pieces(template: ChatTemplateConfig, messages: Iterable[Mapping[str, str]]) -> tuple[str, list[int]]:
    """The prompt's text and where the template put its `end` (after each assistant turn)."""
    messages = list(messages)
    system = template.system
    if messages and messages[0].get("role") == "system":
        system = messages[0]["content"] + "\n\n"
        messages = messages[1:]
    parts, ends, at = [system], [], len(system)
    for m in messages:
        role = m.get("role")
        if role not in ROLES or role == "system":
            raise ValueError(f"message role {role!r} is not user or assistant (a system message goes first)")
        piece = turn_text(template, role, m["content"])
        parts.append(piece)
        at += len(piece)
        if role == "assistant":
            ends.append(at - len(template.end))
    return "".join(parts) + template.assistant_prefix, ends


def render_prompt(template: ChatTemplateConfig, messages: Iterable[Mapping[str, str]]) -> str:
    """The text that asks for the next assistant turn: the system header (the conversation's
    own system message if it has one), every turn, then the assistant's marker."""
    return _prompt_pieces(template, messages)[0]


def prompt_ids(template: ChatTemplateConfig, messages: Iterable[Mapping[str, str]], tokenizer: "Tokenizer") -> list[int]:
    """`render_prompt` as token ids, tokenized as SFT tokenizes its conversations: only the
    template's own `end` is a control token; special-token strings in the messages are text,
    so a user cannot end the assistant's turn by typing `<|endoftext|>`."""
    text, ends = _prompt_pieces(template, messages)
    return tokenizer.encode_with_special_at(text, template.end, ends)


def stop_strings(template: ChatTemplateConfig) -> list[str]:
    """Where an assistant turn ends in generated text."""
    return [template.end, *template.stop]
