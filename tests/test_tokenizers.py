"""Tokenizers: the official World and 20B ids, round trips, specs, streaming decode."""

from __future__ import annotations

import hashlib
import json
import random
import unicodedata

import numpy as np
import pytest

from rwkv_jax.tokenizers import (WORLD_VOCAB_PATH, ByteTokenizer, CharTokenizer, HFTokenizer,
                                 StreamDecoder, TokenizerError, WorldTokenizer, get_tokenizer,
                                 resolve_tokenizer, tokenizer_from_dict)

# Reference §6.
WORLD_EXAMPLES = {
    "Hello world": [33155, 40213],
    "\n\n": [261],
    " Paris": [37138],
    "User: hi\n\nAssistant:": [24281, 59, 4571, 261, 5585, 41693, 59],
}
NEOX_EXAMPLES = {
    "\n": [187],
    "Hello world": [12092, 1533],
    "\nThe following is a": [187, 510, 1563, 310, 247],
}
VARIED = [
    "",
    "a",
    "Hello, world! 123 4567.89 -- done...",
    "今天是美好的一天。東京都は日本の首都です。",
    "😀👍🏽👨‍👩‍👧 flags: 🇯🇵🇫🇷",
    "e\u0301 a\u0308 n\u0303 (combining) vs é ä ñ; Zalgo: z\u0336\u0317a\u0334\u031bl\u0335go",
    "Привет, мир! Γειά σου Κόσμε! 안녕하세요 مرحبا بالعالم שלום עולם",
    "def f(x):\n\treturn x ** 2  # comment\r\n\n\n    indented\x00\x01\x7f",
    " " * 300 + "\n" * 40 + "=" * 200 + "-" * 90 + "end",
]


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


def _varied_text(seed: int, n: int) -> str:
    """Random text biased to what trips tokenizers: spaces, newlines, letters, CJK, emoji."""
    rng = random.Random(seed)
    pools = [lambda: chr(rng.randint(32, 126)), lambda: rng.choice(" \n\t\r"),
             lambda: rng.choice(["the", " the", " and", " of", "ing", "tion", "  "]),
             lambda: chr(rng.randint(0x4E00, 0x9FFF)), lambda: chr(rng.randint(0x1F600, 0x1F64F)),
             lambda: chr(rng.randint(0x80, 0x7FF)), lambda: chr(rng.randint(0x300, 0x36F))]
    return "".join(rng.choice(pools)() for _ in range(n))


# ---- World -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,ids", list(WORLD_EXAMPLES.items()))
def test_world_reference_examples(world, text, ids):
    assert world.encode(text) == ids
    assert world.decode(ids) == text


def test_world_vocab_facts(world):
    assert world.vocab_size == 65536
    assert world.n_vocab_entries == 65529
    assert world.max_token_len == 128
    assert world.tokens[0] == b""                                  # id 0: end of text
    assert [world.tokens[b + 1] for b in range(256)] == [bytes([b]) for b in range(256)]
    assert len(set(world.tokens[1:])) == 65529


def test_packaged_vocab_is_the_official_file():
    # The LF copy (RWKV-v7); the CRLF copies (RWKV-v5, pip) hash 8324476023...c008.
    data = WORLD_VOCAB_PATH.read_bytes()
    assert b"\r\n" not in data
    assert hashlib.sha256(data).hexdigest().startswith("e6dee3d4e31b4d5c")


def test_world_reads_crlf_copy(tmp_path, world):
    crlf = tmp_path / "vocab_crlf.txt"
    crlf.write_bytes(WORLD_VOCAB_PATH.read_bytes().replace(b"\n", b"\r\n"))
    other = WorldTokenizer(crlf)
    assert other.tokens == world.tokens
    assert other.to_dict() == {"type": "world", "path": str(crlf)}


@pytest.mark.parametrize("text", VARIED)
def test_world_round_trip(world, text):
    ids = world.encode(text)
    assert world.decode(ids) == text
    assert all(0 < i < 65530 for i in ids)


def test_world_invalid_utf8_bytes(world):
    data = b"ok \xff\xfe\xc3(\x80 \xe4\xbd end \xf0\x9f\x98"
    ids = world.encode(data)
    assert world.decode_bytes(ids) == data
    assert world.decode(ids) == data.decode("utf-8", errors="replace")
    assert world.encode(bytes([0xFF])) == [256]                    # id = byte + 1


def test_world_piece_cache_matches_plain_greedy(world):
    """The fast path (pieces + cache) against the plain greedy walk, on text that crosses
    piece boundaries in every way the vocab allows (runs of spaces/newlines/punctuation)."""
    rng = random.Random(1)
    for seed in range(30):
        text = _varied_text(seed, rng.randint(1, 400)).encode("utf-8")
        if seed % 3 == 0:
            text += bytes(rng.randrange(256) for _ in range(20))   # invalid UTF-8 too
        assert world._encode_pieces(text) == world.encode_bytes_reference(text), seed
    for text in VARIED:
        data = text.encode("utf-8")
        assert world._encode_pieces(data) == world.encode_bytes_reference(data)


def test_world_long_input_uses_fast_path(world, shared_dir):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_bytes()[:60_000]
    text += "\n\n今天是美好的一天。😀".encode() * 50 + b" " * 1000
    ids = world.encode(text)
    assert ids == world.encode_bytes_reference(text)
    assert world.decode_bytes(ids) == text


def test_world_decode_accepts_arrays_and_rejects_unknown_ids(world):
    ids = world.encode("Hello world")
    assert world.decode(np.asarray(ids, np.int32)) == "Hello world"
    assert world.decode([0, *ids, 0]) == "Hello world"             # end of text is empty
    with pytest.raises(ValueError, match="not in the vocab"):
        world.decode([65530])
    with pytest.raises(ValueError, match="not in the vocab"):
        world.decode([-1])


@pytest.mark.torch
def test_world_matches_official_trie_tokenizer(world, shared_dir):
    # rwkv.rwkv_tokenizer is pure Python (no torch import), but it ships with the package.
    rt = pytest.importorskip("rwkv.rwkv_tokenizer",
                             reason="official rwkv package not installed (pip install rwkv)")
    import pathlib
    official = rt.TRIE_TOKENIZER(str(pathlib.Path(rt.__file__).with_name(
        "rwkv_vocab_v20230424.txt")))
    shakespeare = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    texts = [*WORLD_EXAMPLES, *VARIED, shakespeare[:3000], shakespeare[500_000:503_000],
             shakespeare[-2000:], *(_varied_text(s, 300) for s in range(20))]
    for text in texts:
        assert world.encode(text) == official.encode(text), text[:40]
        assert world.decode(official.encode(text)) == text
    big = shakespeare[:50_000] + "".join(texts)                    # the piece-cache path
    assert world.encode(big) == official.encode(big)


# ---- 20B (GPT-NeoX, Hugging Face tokenizer.json) ------------------------------------------

@pytest.fixture(scope="module")
def neox(shared_dir):
    pytest.importorskip("tokenizers", reason="Hugging Face `tokenizers` not installed "
                                             "(pip install tokenizers)")
    return HFTokenizer(shared_dir / "data" / "tokenizers" / "20B_tokenizer.json")


@pytest.mark.parametrize("text,ids", list(NEOX_EXAMPLES.items()))
def test_20b_reference_examples(neox, text, ids):
    assert neox.encode(text) == ids
    assert neox.decode(ids) == text


def test_20b_vocab_and_bytes(neox):
    assert neox.vocab_size == 50277
    for text in VARIED:
        ids = neox.encode(text)
        # The 20B tokenizer NFC-normalizes its input (e + U+0301 -> é).
        assert neox.decode_bytes(ids) == unicodedata.normalize("NFC", text).encode("utf-8")
        assert neox.decode(ids) == unicodedata.normalize("NFC", text)
    spaces = neox.encode("a" + " " * 20 + "b")                      # added tokens: space runs
    assert neox.decode_bytes(spaces) == b"a" + b" " * 20 + b"b"
    assert tokenizer_from_dict(json.loads(json.dumps(neox.to_dict()))).encode("Hi") == \
        neox.encode("Hi")


# ---- bytes and characters -----------------------------------------------------------------

def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("Hé") == [72, 195, 169]
    assert tok.decode([72, 195, 169]) == "Hé"
    assert tok.decode([72, 195]) == "H\ufffd"
    assert tok.encode(b"\xff\x00") == [255, 0]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([256])


def test_char_tokenizer_nanogpt_shakespeare(shared_dir):
    text = (shared_dir / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    # nanoGPT's shakespeare_char: chars = sorted(set(data)); '\n' = 0, ' ' = 1, 'a' = 39.
    assert tok.chars == "".join(sorted(set(text)))
    assert tok.encode("\n a") == [0, 1, 39]
    sample = text[:5000]
    assert tok.decode(tok.encode(sample)) == sample
    with pytest.raises(ValueError, match="not in the vocabulary.*'@é'"):
        tok.encode("hi @é")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([65])


# ---- specs -------------------------------------------------------------------------------

@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer("ba\nc"), WorldTokenizer()],
                         ids=["bytes", "char", "world"])
def test_to_dict_round_trip(tok):
    d = json.loads(json.dumps(tok.to_dict()))
    again = tokenizer_from_dict(d)
    assert type(again) is type(tok) and again.vocab_size == tok.vocab_size
    assert again.to_dict() == d
    text = "cab\nba"
    assert again.encode(text) == tok.encode(text)


def test_tokenizer_from_dict_unknown_type():
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        tokenizer_from_dict({"type": "sentencepiece"})


def test_get_tokenizer_choices(tmp_path):
    assert isinstance(get_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(get_tokenizer("world"), WorldTokenizer)
    assert isinstance(get_tokenizer(None, vocab_size=256), ByteTokenizer)
    assert isinstance(get_tokenizer(None, vocab_size=65536), WorldTokenizer)
    with pytest.raises(ValueError, match="20B_tokenizer.json"):
        get_tokenizer(None, vocab_size=50277)
    with pytest.raises(ValueError, match="cannot infer.*bytes, world"):
        get_tokenizer(None, vocab_size=1000)
    with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'.*bytes, world"):
        get_tokenizer("gpt2")
    with pytest.raises(ValueError, match="not found"):
        get_tokenizer(str(tmp_path / "missing.json"))


def test_get_tokenizer_hf_path(shared_dir):
    pytest.importorskip("tokenizers", reason="Hugging Face `tokenizers` not installed")
    tok = get_tokenizer(str(shared_dir / "data" / "tokenizers" / "20B_tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 50277


# ---- streaming ---------------------------------------------------------------------------

def test_stream_decoder_never_emits_half_a_character():
    tok = ByteTokenizer()
    stream = StreamDecoder(tok)
    pieces = [stream.feed(b) for b in "aé😀b".encode("utf-8")]
    # 'a', then é's 2 bytes, then 😀's 4 bytes: nothing until each character is whole.
    assert pieces == ["a", "", "é", "", "", "", "😀", "b"]
    assert stream.flush() == ""


def test_stream_decoder_flush_replaces_dangling_partial():
    stream = StreamDecoder(ByteTokenizer())
    assert stream.feed(list("x😀".encode())[:-1]) == "x"
    assert stream.flush() == "\ufffd"
    assert stream.feed(list("ok".encode())) == "ok"                 # usable after flush


def test_stream_decoder_world_split_character(world):
    # 你 = e4 bd a0, fed as the three single-byte World ids (byte + 1).
    ids = [0xE4 + 1, 0xBD + 1, 0xA0 + 1, *world.encode("!")]
    stream = StreamDecoder(world)
    assert [stream.feed(i) for i in ids] == ["", "", "你", "!"]
    assert stream.flush() == ""


# ---- resolve_tokenizer: the one resolver ---------------------------------------------------

def _write_json(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def test_resolve_named_specs_and_inference():
    assert isinstance(resolve_tokenizer("bytes"), ByteTokenizer)
    assert isinstance(resolve_tokenizer("byte"), ByteTokenizer)
    assert isinstance(resolve_tokenizer("world"), WorldTokenizer)
    assert isinstance(resolve_tokenizer(None, vocab_size=256), ByteTokenizer)
    assert isinstance(resolve_tokenizer(None, vocab_size=65536), WorldTokenizer)
    assert isinstance(resolve_tokenizer({"type": "bytes"}), ByteTokenizer)
    tok = ByteTokenizer()
    assert resolve_tokenizer(tok) is tok                       # an object passes through
    with pytest.raises(TokenizerError, match="cannot infer.*vocab_size=1000"):
        resolve_tokenizer(None, vocab_size=1000)
    with pytest.raises(TokenizerError, match="no tokenizer given"):
        resolve_tokenizer(None)
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt2'"):
        resolve_tokenizer("gpt2")
    assert issubclass(TokenizerError, ValueError)


def test_resolve_char_needs_text():
    tok = resolve_tokenizer("char", text=lambda: ["hello", " world"])
    assert isinstance(tok, CharTokenizer) and tok.chars == " dehlorw"
    assert resolve_tokenizer("char", text=["ba"]).chars == "ab"
    with pytest.raises(TokenizerError, match="'char' builds its vocabulary"):
        resolve_tokenizer("char")


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer("ab\n"), WorldTokenizer()],
                         ids=["bytes", "char", "world"])
def test_resolve_run_directory_and_its_tokenizer_json(tmp_path, tok):
    # What training writes: run_dir/tokenizer.json = tok.to_dict().
    run = tmp_path / "run"
    run.mkdir()
    _write_json(run / "tokenizer.json", tok.to_dict())
    for spec in (run, str(run), str(run / "tokenizer.json")):
        again = resolve_tokenizer(spec)
        assert type(again) is type(tok) and again.to_dict() == tok.to_dict()
    # spec None: the model's run directory wins over inference by vocab size
    assert type(resolve_tokenizer(None, model_path=run, vocab_size=65536)) is type(tok)
    # a run directory without one falls back to the vocab size
    bare = tmp_path / "bare"
    bare.mkdir()
    assert isinstance(resolve_tokenizer(None, model_path=bare, vocab_size=256), ByteTokenizer)
    with pytest.raises(TokenizerError, match="bare: a directory without a tokenizer.json"):
        resolve_tokenizer(bare)


def test_resolve_vocab_larger_than_model_is_an_error():
    with pytest.raises(TokenizerError, match="'world' has 65536 ids, the model only 256"):
        resolve_tokenizer("world", vocab_size=256)
    assert isinstance(resolve_tokenizer("bytes", vocab_size=65536), ByteTokenizer)


@pytest.mark.parametrize("content,match", [
    ("{not json", "not a readable tokenizer.json"),
    ('{"type": "sentencepiece"}', "unknown tokenizer type 'sentencepiece'"),
    ('{"type": "char"}', "lacks the 'chars' field"),
    ('{"type": "char", "chars": ""}', "needs at least one character"),
    ('{"type": "world", "path": "/nonexistent/vocab.txt"}', "bad tokenizer spec"),
    ('["a", "list"]', "neither an rwkv-jax tokenizer spec"),
    ('{"version": "1.0"}', "neither an rwkv-jax tokenizer spec"),
    ('{"version": "1.0", "model": {"type": "Nonsense"}}', "not a valid Hugging Face"),
])
def test_resolve_malformed_tokenizer_json_names_the_file(tmp_path, content, match):
    if "Hugging Face" in match:
        pytest.importorskip("tokenizers")
    bad = tmp_path / "run" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text(content, encoding="utf-8")
    for spec in (bad, bad.parent):
        with pytest.raises(TokenizerError, match=match) as e:
            resolve_tokenizer(spec)
        assert str(bad) in str(e.value)
    with pytest.raises(TokenizerError, match=match):
        resolve_tokenizer(None, model_path=bad.parent, vocab_size=256)


def test_resolve_hf_file_and_rwkv_spec_pointing_at_it(tmp_path, shared_dir):
    pytest.importorskip("tokenizers", reason="Hugging Face `tokenizers` not installed")
    hf = shared_dir / "data" / "tokenizers" / "20B_tokenizer.json"
    tok = resolve_tokenizer(str(hf), vocab_size=50304)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 50277
    spec = _write_json(tmp_path / "tokenizer.json", tok.to_dict())  # a run dir of a 20B model
    assert resolve_tokenizer(tmp_path).encode("Hello world") == [12092, 1533]
    assert resolve_tokenizer(spec).encode("Hello world") == [12092, 1533]


def test_resolve_world_vocab_txt(tmp_path):
    tok = resolve_tokenizer(str(WORLD_VOCAB_PATH))
    assert isinstance(tok, WorldTokenizer) and tok.encode("Hello world") == [33155, 40213]
    bad = tmp_path / "vocab.txt"
    bad.write_text("1 'a' 1\n3 'b' 2\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="vocab.txt"):
        resolve_tokenizer(bad)
    with pytest.raises(TokenizerError, match="not found"):
        resolve_tokenizer(str(tmp_path / "missing.txt"))
