"""Text and ``.jsonl`` files -> prepared token files (:func:`prepare`), streamed in bounded
memory.

A text file is one document; a ``.jsonl`` file holds one document per line: ``{"text": ...}``,
or a chat record (:mod:`rwkv_jax.data.chat`), tokenized with its loss mask. Every document is
followed by the document separator (if any), and its end is recorded, so the prepared file knows
its documents (for packing).
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from rwkv_jax.data import chat
from rwkv_jax.data.files import DataError, PathLike, open_text_file
from rwkv_jax.data.formats import TokenSource, TokenWriter, write_prepared
from rwkv_jax.data.jsonl import read_jsonl
from rwkv_jax.tokenizers import resolve_tokenizer

if TYPE_CHECKING:
    from rwkv_jax.tokenizers import Tokenizer

__all__ = ["prepare", "encode_pieces", "encode_stream", "iter_file_text", "PIECE_CHARS",
           "MARGIN_CHARS"]

# Text is read and tokenized in pieces of PIECE_CHARS characters (bounded memory); the last
# MARGIN_CHARS of each are re-encoded with the next piece (see encode_pieces). Read at call time,
# so tests may shrink them.
PIECE_CHARS = 1 << 20
MARGIN_CHARS = 1024


def _default_separator(tokenizer: Tokenizer) -> int | None:
    # World and GPT-NeoX-20B both use id 0 as end-of-text; byte/char vocabularies have no
    # reserved id, so nothing is inserted.
    name = str(getattr(tokenizer, "name", "")).lower()
    return 0 if any(k in name for k in ("world", "20b", "neox")) else None


def _text_pieces(f: io.TextIOBase) -> Iterator[str]:
    while chunk := f.read(PIECE_CHARS):
        yield chunk


def encode_pieces(pieces: Iterable[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Encode a long text given in pieces, as if it were encoded whole, in bounded memory.

    Each piece is encoded with the unfinished tail of the previous one in front. Only the ids
    that end more than ``MARGIN_CHARS`` before the end of the text so far are emitted; the
    tail they leave is carried over and re-encoded. The cut always falls where the emitted ids
    decode exactly to a prefix of the text, so no text is lost or repeated with any tokenizer
    whose ``decode`` inverts ``encode``. For tokenizers whose choice at a position depends
    on a bounded lookahead shorter than the margin (bytes, chars, World's greedy match of
    tokens up to 128 bytes) the result equals encoding the whole text at once.
    """
    carry, rest = "", []
    for piece in pieces:
        text = carry + piece
        ids = tokenizer.encode(text)
        keep, carry = _stable_prefix(ids, text, tokenizer)
        if len(carry) > 4 * PIECE_CHARS:  # no clean cut in sight: bound memory, cut here
            keep, carry = len(ids), ""
        yield ids[:keep]
        rest = ids[keep:]
    yield rest  # at the end of the text the carried ids are final as they stand


def _stable_prefix(ids: list[int], text: str, tokenizer: Tokenizer) -> tuple[int, str]:
    """``(k, tail)``: ``ids[k:]`` decode exactly to ``tail``, a suffix of ``text`` of at least
    ``MARGIN_CHARS``. ``(0, text)`` while the text is too short to emit anything;
    ``(len(ids), "")`` (a plain cut) when no clean cut is found, e.g. a ``decode`` that does
    not invert ``encode``."""
    margin = MARGIN_CHARS
    if len(text) <= 2 * margin or len(ids) < 2:
        return 0, text
    # First guess from the mean characters per token, then widen.
    m, misses = max(1, min(len(ids) - 1, len(ids) * margin // len(text))), 0
    while m < len(ids):
        tail = tokenizer.decode(ids[len(ids) - m:])
        if len(tail) < margin:  # short tokens here (e.g. bytes of CJK text): take more
            m = min(2 * m, len(ids))
            continue
        # Clean when the tail is a suffix of the text, i.e. not a split UTF-8 sequence
        # (which decodes to U+FFFD); a few steps back always find one for exact tokenizers.
        if text.endswith(tail):
            return len(ids) - m, tail
        misses += 1
        if misses > 16:
            return len(ids), ""
        m += 1
    return 0, text


def encode_stream(f: io.TextIOBase, writer: TokenWriter, tokenizer: Tokenizer, where: str,
                  mask: int = 1) -> None:
    """Tokenize the text stream ``f`` in pieces (:func:`encode_pieces`) into ``writer``."""
    for ids in encode_pieces(_text_pieces(f), tokenizer):
        writer.extend(ids, where, mask)


def _jsonl_document(obj: Any, where: str) -> str | list[chat.Message]:
    """A ``.jsonl`` value as a text document (str) or a conversation (messages)."""
    if chat.is_chat_record(obj):
        return chat.messages_from_record(obj, where)
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise DataError(f'{where}: expected an object with a string "text" field, or a chat '
                        'record ({"prompt", "response"} or {"messages": [...]})')
    return obj["text"]


def iter_file_text(path: pathlib.Path) -> Iterator[str]:
    """The text :func:`prepare` tokenizes from ``path``, in pieces (chat records rendered),
    for building a character vocabulary."""
    if path.suffix.lower() == ".jsonl":
        for lineno, obj in read_jsonl(path):
            doc = _jsonl_document(obj, f"{path}:{lineno}")
            yield doc if isinstance(doc, str) else chat.render_chat(doc)
    else:
        try:
            with open_text_file(path) as f:
                yield from _text_pieces(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None


def _prepare_file(path: pathlib.Path, writer: TokenWriter, tokenizer: Tokenizer,
                  sep: int | None, loss_on: str) -> dict:
    start, n_docs, n_chat = writer.count, 0, 0
    if path.suffix.lower() == ".jsonl":
        for lineno, obj in read_jsonl(path):
            where = f"{path}:{lineno}"
            doc = _jsonl_document(obj, where)
            if isinstance(doc, str):
                encode_stream(io.StringIO(doc), writer, tokenizer, where)
                sep_mask = 1
            else:
                ids, mask = chat.encode_chat(doc, tokenizer, loss_on=loss_on)
                writer.extend(ids, where, mask)
                sep_mask, n_chat = int(loss_on == "all"), n_chat + 1
            if sep is not None:
                writer.extend([sep], where, sep_mask)
            writer.end_document()
            n_docs += 1
    else:
        try:
            with open_text_file(path) as f:
                encode_stream(f, writer, tokenizer, str(path))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
        if sep is not None:
            writer.extend([sep], str(path))
        writer.end_document()
        n_docs = 1
    out = {"path": str(path), "bytes": path.stat().st_size, "n_docs": n_docs,
           "n_tokens": writer.count - start}
    if n_chat:
        out["n_chat"] = n_chat
    return out


def prepare(inputs: Sequence[PathLike] | PathLike, out_prefix: PathLike,
            tokenizer: Tokenizer | str, *,
            doc_separator: int | None | Literal["auto"] = "auto",
            loss_on: Literal["all", "response"] = "all") -> TokenSource:
    """Tokenize text files into ``out_prefix.bin`` (raw ids) + ``out_prefix.json`` (metadata).

    Args:
      inputs: files, in order. ``.jsonl``: one document per line (blank lines are skipped; a
        bad line raises :class:`DataError` naming file and line), either ``{"text": ...}`` or
        a chat record (:mod:`rwkv_jax.data.chat`: ``{"prompt", "response"}`` or
        ``{"messages": [...]}``) rendered in the World chat format. Any other suffix: the
        whole file is one UTF-8 document, line endings kept.
      out_prefix: output path without suffix.
      tokenizer: any object with ``name``, ``vocab_size``, ``encode``, ``decode``,
        ``to_dict``; or a spec for :func:`rwkv_jax.tokenizers.resolve_tokenizer` (``"char"``
        builds the vocabulary from the inputs; a run directory or ``tokenizer.json`` works).
      doc_separator: id appended after every document, or None. ``"auto"``: 0 (end-of-text) for
        World / 20B tokenizers, None for byte and char tokenizers.
      loss_on: ``"all"`` (default): every token is a target, no mask is written.
        ``"response"``: also write ``out_prefix.mask.bin``, 1 on the assistant replies of chat
        records (and on every token of text documents), 0 on prompts, role prefixes and the
        separator after a conversation. Needs at least one chat record.

    Returns:
      The prepared tokens as a :class:`TokenSource` (with ``mask`` and ``doc_offsets``).

    Streaming with bounded memory: text is encoded in ~1M-character pieces that overlap by a
    margin, giving the same ids as encoding each document whole for byte, char and World
    tokenizers (see :func:`encode_pieces`). All files are written to temporaries and renamed
    into place.
    """
    paths = [pathlib.Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [
        pathlib.Path(p) for p in inputs]
    if not paths:
        raise DataError("prepare: no input files")
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p}: no such file")
    if loss_on not in chat.LOSS_ON:
        raise DataError(f"loss_on must be one of {', '.join(chat.LOSS_ON)}, got {loss_on!r}")
    tokenizer = resolve_tokenizer(tokenizer,
                                  text=lambda: (t for p in paths for t in iter_file_text(p)))
    sep = _default_separator(tokenizer) if doc_separator == "auto" else doc_separator

    def fill(w: TokenWriter) -> list[dict]:
        sources = [_prepare_file(p, w, tokenizer, sep, loss_on) for p in paths]
        if loss_on == "response" and not any(s.get("n_chat") for s in sources):
            raise DataError(f"loss_on='response' masks chat prompts, but "
                            f"{', '.join(map(str, paths))} hold no chat records "
                            '({"prompt", "response"} or {"messages": [...]})')
        return sources

    return write_prepared(out_prefix, tokenizer, sep, fill,
                          loss_on="response" if loss_on == "response" else None)
