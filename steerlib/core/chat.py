"""Chat formatting with the model's own template."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def format_prompt(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None = None) -> str:
    """The templated conversation up to and including the assistant's generation prompt.

    Args:
        tokenizer: a tokenizer with a chat template.
        user: the user's message.
        system: optional system prompt; None lets the template use its default.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no chat template; set tokenizer.chat_template or pass "
            "pre-formatted prompts (raw=True)"
        )
    messages = []
    if system is not None:
        messages.append({"role": "system", "content": _check_text(system, "system prompt")})
    messages.append({"role": "user", "content": _check_text(user, "user message")})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, str | None]:
    """Split a chat ``messages`` list into (prompt text with generation prompt, final assistant reply).

    The last assistant message, if there is one, is the response; everything before it is the prompt.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        _check_text(m["content"], f"message {i} content")
    response = None
    if messages[-1]["role"] == "assistant":
        response = messages[-1]["content"]
        messages = messages[:-1]
    if not messages:
        raise ValueError("messages hold a response but no prompt before it")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no chat template")
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt, response
