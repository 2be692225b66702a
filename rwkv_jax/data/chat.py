"""Chat / instruction data in RWKV's World chat format, tokenized with a per-token loss mask.

The template (the one place it is defined; generation builds its chat prompts with it too)::

    System: {content}\\n\\n          (optional, first)
    User: {content}\\n\\n
    Assistant: {content}\\n\\n

and a generation prompt ends with ``"Assistant:"`` (no trailing space: the World tokenizer
joins the space to the next word, so the model generates ``" Hello"`` itself). ``"\\n\\n"``
ends every turn and is what a chat front end stops at.

Normalisation (RWKV / ChatRWKV convention): content is stripped, ``\\r\\n`` becomes ``\\n``, and
every run of two or more newlines inside content collapses to one ``\\n`` (ChatRWKV does the same to
user input), so ``"\\n\\n"`` only ever ends a turn.

Records (one per ``.jsonl`` line): ``{"prompt": ..., "response": ...}`` (optionally
``"system"``), or ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...},
...]}``.

Tokenization (:func:`encode_chat`) encodes the rendered conversation in pieces and
concatenates them: each assistant turn's body (``" " + content + "\\n\\n"``) is one piece, and
everything between bodies (system and user turns, role prefixes up to ``"Assistant:"``) is
one piece. So the context before each reply is tokenized exactly as a generation prompt is,
and no token straddles a masked/unmasked boundary, whatever the tokenizer merges.
``loss_on="response"`` sets the mask to 1 on the assistant bodies only (their content and the
``"\\n\\n"`` that ends them, so the model learns to stop); ``loss_on="all"`` on every token.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from rwkv_jax.data.files import DataError

__all__ = ["ROLE_NAMES", "TURN_END", "LOSS_ON", "Message", "ChatTokens", "normalize_content",
           "turn_parts", "render_turn", "render_chat", "generation_prompt", "is_chat_record",
           "messages_from_record", "encode_chat"]

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_END = "\n\n"
LOSS_ON = ("all", "response")
_NEWLINES = re.compile(r"\n{2,}")


class Message(NamedTuple):
    role: str      # "system", "user" or "assistant"
    content: str


class ChatTokens(NamedTuple):
    """``ids``: ``[N]`` int64; ``mask``: ``[N]`` uint8, 1 where the token is a loss target."""

    ids: np.ndarray
    mask: np.ndarray


def normalize_content(text: str) -> str:
    """Strip, ``\\r\\n`` -> ``\\n``, and collapse runs of newlines to one (no ``"\\n\\n"`` left)."""
    return _NEWLINES.sub("\n", text.replace("\r\n", "\n").strip())


def turn_parts(role: str, content: str) -> tuple[str, str]:
    """``(prefix, body)`` of one turn: ``("User:", " hi\\n\\n")``; content is normalised."""
    if role not in ROLE_NAMES:
        raise ValueError(f"unknown chat role {role!r}; expected one of {', '.join(ROLE_NAMES)}")
    return f"{ROLE_NAMES[role]}:", f" {normalize_content(content)}{TURN_END}"


def render_turn(role: str, content: str) -> str:
    """One turn as text: ``"User: hi\\n\\n"``."""
    return "".join(turn_parts(role, content))


def generation_prompt(role: str = "assistant") -> str:
    """What a prompt ends with to make the model speak as ``role``: ``"Assistant:"``."""
    return turn_parts(role, "")[0]


def _as_messages(messages: Iterable[Any]) -> list[Message]:
    return [Message(m["role"], m["content"]) if isinstance(m, dict) else Message(*m)
            for m in messages]


def render_chat(messages: Iterable[Message | tuple[str, str] | dict], *,
                add_generation_prompt: bool = False) -> str:
    """The conversation as text, optionally followed by ``"Assistant:"`` for generation."""
    text = "".join(render_turn(m.role, m.content) for m in _as_messages(messages))
    return text + generation_prompt() if add_generation_prompt else text


def is_chat_record(obj: Any) -> bool:
    """Whether a ``.jsonl`` value is a chat record (has ``"messages"`` or ``"prompt"``/
    ``"response"``)."""
    return isinstance(obj, dict) and any(k in obj for k in ("messages", "prompt", "response"))


def messages_from_record(obj: Any, where: str) -> list[Message]:
    """The messages of a chat record, validated; :class:`DataError` naming ``where`` (e.g.
    ``path:line``) and the field otherwise."""
    if not is_chat_record(obj):
        raise DataError(f'{where}: expected a chat record ({{"prompt", "response"}} or '
                        f'{{"messages": [...]}})')
    if "messages" in obj:
        if any(k in obj for k in ("prompt", "response", "text")):
            raise DataError(f'{where}: "messages" together with "prompt"/"response"/"text"; '
                            "give one form")
        items = obj["messages"]
        if not isinstance(items, list) or not items:
            raise DataError(f'{where}: "messages" must be a non-empty list')
        out = []
        for i, m in enumerate(items):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise DataError(f'{where}: messages[{i}] must be an object with a string '
                                '"content"')
            if m.get("role") not in ROLE_NAMES:
                raise DataError(f"{where}: messages[{i}] has role {m.get('role')!r}; expected "
                                f"one of {', '.join(ROLE_NAMES)}")
            out.append(Message(m["role"], m["content"]))
    else:
        if "text" in obj:
            raise DataError(f'{where}: "text" together with "prompt"/"response"; give one form')
        for key in ("prompt", "response"):
            if not isinstance(obj.get(key), str):
                raise DataError(f'{where}: "{key}" must be a string')
        if "system" in obj and not isinstance(obj["system"], str):
            raise DataError(f'{where}: "system" must be a string')
        out = ([Message("system", obj["system"])] if "system" in obj else []) + [
            Message("user", obj["prompt"]), Message("assistant", obj["response"])]
    for i, m in enumerate(out):
        if not normalize_content(m.content):
            raise DataError(f"{where}: message {i} ({m.role}) is empty")
    return out


def encode_chat(messages: Sequence[Message | tuple[str, str] | dict], tokenizer, *,
                loss_on: Literal["all", "response"] = "response") -> ChatTokens:
    """Token ids and loss mask of a conversation (see the module docstring for the pieces).

    ``tokenizer.decode(ids)`` is exactly :func:`render_chat` ``(messages)`` for any tokenizer
    whose ``decode`` inverts ``encode``.
    """
    if loss_on not in LOSS_ON:
        raise DataError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    ids: list[int] = []
    mask: list[int] = []
    context = ""

    def emit(text: str, target: int) -> None:
        piece = tokenizer.encode(text)
        ids.extend(piece)
        mask.extend([target] * len(piece))

    for m in _as_messages(messages):
        prefix, body = turn_parts(m.role, m.content)
        if m.role != "assistant":
            context += prefix + body
            continue
        emit(context + prefix, int(loss_on == "all"))
        emit(body, 1)
        context = ""
    if context:
        emit(context, int(loss_on == "all"))
    return ChatTokens(np.asarray(ids, np.int64), np.asarray(mask, np.uint8))
