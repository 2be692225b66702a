"""Training data: token files, the default corpus, chat data, splits and step-keyed sampling.

Every reader returns a :class:`TokenSource`: a 1-D memory-mapped token array (nothing is loaded
into memory), the tokenizer when it is known, and, when recorded, a per-token loss mask and
the document boundaries. :func:`open_tokens` picks the reader from what is on disk.

Modules (one job each; this package re-exports their public API):

* :mod:`~rwkv_jax.data.files` -- :class:`DataError` and atomic file writes.
* :mod:`~rwkv_jax.data.jsonl` -- the one ``.jsonl`` reader, :func:`read_jsonl`.
* :mod:`~rwkv_jax.data.formats` -- :class:`TokenSource`; prepared ``.bin`` + ``.json`` (and
  ``.mask.bin``/``.docs.bin``) and Megatron binidx, read and write.
* :mod:`~rwkv_jax.data.chat` -- the World chat template and chat records -> tokens + loss mask.
* :mod:`~rwkv_jax.data.text` -- :func:`prepare`: text / ``.jsonl`` -> prepared, streamed.
* :mod:`~rwkv_jax.data.cache` -- the token cache (:func:`default_cache_dir`).
* :mod:`~rwkv_jax.data.corpus` -- the default corpus, the Python stdlib's own source.
* :mod:`~rwkv_jax.data.sources` -- :func:`open_tokens`, :func:`open_text`.
* :mod:`~rwkv_jax.data.order` -- which sample a ``(seed, step, row)`` draws (random, magic prime).
* :mod:`~rwkv_jax.data.pack` -- packed rows of whole documents with resets and loss mask.
* :mod:`~rwkv_jax.data.sampling` -- split, :func:`sample_batch`, evaluation windows.
* :mod:`~rwkv_jax.data.fingerprint` -- :func:`fingerprint` of the data for exact resume.
"""

from rwkv_jax.data.cache import CACHE_VERSION, TokenizerLike, default_cache_dir
from rwkv_jax.data.chat import (Message, encode_chat, messages_from_record, render_chat,
                                render_turn)
from rwkv_jax.data.corpus import (STDLIB_SEPARATOR, open_stdlib_corpus, stdlib_corpus,
                                  stdlib_documents, stdlib_files)
from rwkv_jax.data.files import DataError, PathLike
from rwkv_jax.data.fingerprint import CONTENT_KEYS, fingerprint, fingerprint_diff
from rwkv_jax.data.formats import (BINIDX_MAGIC, PREPARED_FORMAT, PREPARED_VERSION, BinIdx,
                                   TokenSource, read_binidx, read_prepared, token_dtype,
                                   write_binidx)
from rwkv_jax.data.jsonl import TornLineError, read_jsonl
from rwkv_jax.data.order import is_prime, magic_prime, magic_prime_offsets
from rwkv_jax.data.pack import (Batch, Packing, document_offsets, pack_documents,
                                sample_packed_batch)
from rwkv_jax.data.sampling import (EvalBatch, SourceSplit, TrainValSplit, count_eval_batches,
                                    count_utf8_bytes, eval_batches, sample_batch, split_source,
                                    split_tokens)
from rwkv_jax.data.sources import open_text, open_tokens
from rwkv_jax.data.text import prepare

__all__ = [
    "DataError", "TokenSource", "TrainValSplit", "SourceSplit", "EvalBatch", "Batch",
    "token_dtype", "prepare", "read_prepared", "write_binidx", "read_binidx", "BinIdx",
    "open_tokens", "open_text", "default_cache_dir",
    "stdlib_corpus", "stdlib_documents", "stdlib_files", "open_stdlib_corpus",
    "STDLIB_SEPARATOR",
    "split_tokens", "split_source", "sample_batch", "sample_packed_batch", "Packing",
    "pack_documents", "document_offsets", "magic_prime", "magic_prime_offsets", "is_prime",
    "eval_batches", "count_eval_batches", "count_utf8_bytes",
    "read_jsonl", "TornLineError",
    "Message", "render_turn", "render_chat", "messages_from_record", "encode_chat",
    "fingerprint", "fingerprint_diff", "CONTENT_KEYS",
    "PREPARED_FORMAT", "PREPARED_VERSION", "BINIDX_MAGIC", "CACHE_VERSION", "TokenizerLike",
    "PathLike",
]
