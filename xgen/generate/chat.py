"""XGen-Inst's conversation format, rendered from `chat_template` in the config.

One function renders a conversation for inference (ending with the assistant's marker, so
the model writes the next answer); the SFT data path renders the same turns with the same
strings, so training and inference never disagree."""

from __future__ import annotations

from typing import Iterable, Mapping

from xgen.config import ChatTemplateConfig

ROLES = ("system", "user", "assistant")


def turn_text(template: ChatTemplateConfig, role: str, content: str) -> str:
    """One turn as text; an assistant turn includes its end-of-text."""
    if role == "user":
        return template.human.format(content=content)
    if role == "assistant":
        return f"{template.assistant_prefix} {content}{template.end}"
    raise ValueError(f"role {role!r} is not one of user, assistant")


def render_prompt(template: ChatTemplateConfig, messages: Iterable[Mapping[str, str]]) -> str:
    """The text that asks for the next assistant turn: the system header (the conversation's
    own system message if it has one), every turn, then the assistant's marker."""
    messages = list(messages)
    system = template.system
    if messages and messages[0].get("role") == "system":
        system = messages[0]["content"] + "\n\n"
        messages = messages[1:]
    parts = [system]
    for m in messages:
        role = m.get("role")
        if role not in ROLES or role == "system":
            raise ValueError(f"message role {role!r} is not user or assistant (a system message goes first)")
        parts.append(turn_text(template, role, m["content"]))
    return "".join(parts) + template.assistant_prefix


def stop_strings(template: ChatTemplateConfig) -> list[str]:
    """Where an assistant turn ends in generated text."""
    return [template.end, *template.stop]
