"""Chat / instruction data: the World chat template, normalisation, loss masks, prepare."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rwkv_jax import data
from rwkv_jax.data import DataError, chat
from rwkv_jax.tokenizers import ByteTokenizer, WorldTokenizer

CONVO = [{"role": "system", "content": "You are terse."},
         {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "  two\r\n\r\n\nparas  "},
         {"role": "assistant", "content": "One.\n\nTwo."}]
RENDERED = ("System: You are terse.\n\nUser: hi\n\nAssistant: Hello!\n\n"
            "User: two\nparas\n\nAssistant: One.\nTwo.\n\n")


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


def test_template_and_normalisation():
    assert chat.render_turn("user", "hi") == "User: hi\n\n"
    assert chat.turn_parts("assistant", " Hi \n\n\n there ") == ("Assistant:", " Hi \n there\n\n")
    assert chat.generation_prompt() == "Assistant:"
    assert chat.render_chat(CONVO) == RENDERED
    assert chat.render_chat([("user", "q")], add_generation_prompt=True) == \
        "User: q\n\nAssistant:"
    assert chat.normalize_content("a\r\n\r\nb\n\n\n\nc\n") == "a\nb\nc"
    with pytest.raises(ValueError, match="unknown chat role 'bot'"):
        chat.render_turn("bot", "x")


def _bodies(messages) -> list[str]:
    return [chat.turn_parts(m["role"], m["content"])[1] for m in messages
            if m["role"] == "assistant"]


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of each run of 1s."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def test_world_pieces_decode_to_the_rendered_text_and_mask_only_replies(world):
    ids, mask = chat.encode_chat(CONVO, world, loss_on="response")
    assert ids.dtype == np.int64 and mask.dtype == np.uint8 and ids.shape == mask.shape
    assert world.decode(ids) == RENDERED
    # the unmasked runs are exactly the assistant bodies (" content\n\n"), nothing else
    runs = _runs(mask)
    assert [world.decode(ids[a:b]) for a, b in runs] == _bodies(CONVO) == \
        [" Hello!\n\n", " One.\nTwo.\n\n"]
    assert world.decode(ids[runs[0][1] - 1:runs[0][1]]) == "\n\n"  # the stop is a target
    # the context before each reply is tokenized as the generation prompt would be
    prompt = "System: You are terse.\n\nUser: hi\n\nAssistant:"
    assert ids[:runs[0][0]].tolist() == world.encode(prompt)
    all_ids, all_mask = chat.encode_chat(CONVO, world, loss_on="all")
    np.testing.assert_array_equal(all_ids, ids)  # same tokens, only the mask differs
    assert all_mask.all()


class MergingStandIn:
    """Greedy bytes with tokens that straddle turn boundaries (as a BPE could)."""

    name = "merging-standin"
    extra = [b": Hel", b"!\n\nUs", b"\n\nAss"]
    vocab_size = 256 + len(extra)

    def encode(self, text):
        data_, out, i = text.encode(), [], 0
        while i < len(data_):
            j = next((k for k, t in enumerate(self.extra) if data_.startswith(t, i)), None)
            out.append(data_[i] if j is None else 256 + j)
            i += 1 if j is None else len(self.extra[j])
        return out

    def decode(self, ids):
        return b"".join(self.extra[i - 256] if i >= 256 else bytes([i]) for i in ids).decode()

    def to_dict(self):
        return {"name": self.name}


def test_pieces_never_straddle_the_mask_boundary():
    tok = MergingStandIn()
    msgs = CONVO[1:4]
    whole = tok.encode(chat.render_chat(msgs))
    assert any(i >= 256 for i in whole)  # encoded whole, tokens would cross the boundary
    ids, mask = chat.encode_chat(msgs, tok, loss_on="response")
    assert tok.decode(ids.tolist()) == chat.render_chat(msgs)
    assert [tok.decode(ids[a:b].tolist()) for a, b in _runs(mask)] == [" Hello!\n\n"]


@pytest.mark.parametrize("record,match", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"messages\[0\] has role 'bot'"),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] must be an object"),
    ({"messages": [{"role": "user", "content": " \n "}]}, r"message 0 \(user\) is empty"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "y"}, "give one form"),
    ({"prompt": "x"}, '"response" must be a string'),
    ({"prompt": "x", "response": "y", "text": "z"}, "give one form"),
    ({"prompt": "x", "response": "y", "system": 3}, '"system" must be a string'),
])
def test_bad_records_name_the_line(record, match):
    with pytest.raises(DataError, match=rf"f\.jsonl:7: .*{match}"):
        chat.messages_from_record(record, "f.jsonl:7")


def test_prompt_response_records():
    assert chat.messages_from_record({"prompt": "q", "response": "a", "system": "s"}, "x") == [
        ("system", "s"), ("user", "q"), ("assistant", "a")]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_prepare_chat_writes_mask_and_reads_it_back(tmp_path, world):
    recs = [{"messages": CONVO}, {"text": "plain text doc"},
            {"prompt": "Capital of France?", "response": "Paris."}]
    p = _jsonl(tmp_path / "chat.jsonl", recs)
    src = data.prepare([p], tmp_path / "c", world, loss_on="response")
    meta = json.loads((tmp_path / "c.json").read_text())
    assert meta["mask"] == {"file": "c.mask.bin", "dtype": "uint8", "loss_on": "response"}
    assert meta["sources"][0]["n_chat"] == 2 and meta["doc_separator"] == 0
    assert (tmp_path / "c.mask.bin").stat().st_size == len(src)
    # expected: each document's ids + mask, then the separator (masked for conversations)
    want_ids, want_mask = [], []
    for r in recs:
        if "text" in r:
            ids, mask = world.encode(r["text"]), [1] * len(world.encode(r["text"]))
            sep_mask = 1
        else:
            msgs = chat.messages_from_record(r, "x")
            ids, mask = (a.tolist() for a in chat.encode_chat(msgs, world, loss_on="response"))
            sep_mask = 0
        want_ids += ids + [0]
        want_mask += mask + [sep_mask]
    for s in (src, data.read_prepared(tmp_path / "c"), data.open_tokens(tmp_path / "c.bin")):
        assert s.tokens.tolist() == want_ids and s.mask.tolist() == want_mask
        ends = np.cumsum([len(world.encode(r["text"])) + 1 if "text" in r else
                          len(chat.encode_chat(chat.messages_from_record(r, "x"), world)[0]) + 1
                          for r in recs])
        assert s.doc_offsets.tolist() == [0, *ends.tolist()]
    # without loss_on the same file trains on everything and writes no mask
    plain = data.prepare([p], tmp_path / "c", world)
    assert plain.mask is None and not (tmp_path / "c.mask.bin").exists()
    assert plain.tokens.tolist() == want_ids


def test_prepare_response_mask_needs_chat_records(tmp_path):
    p = _jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="loss_on='response'.*no chat records"):
        data.prepare([p], tmp_path / "t", ByteTokenizer(), loss_on="response")
    assert not list(tmp_path.glob("t.*bin")) and not list(tmp_path.glob(".t*"))
    with pytest.raises(DataError, match="loss_on must be one of all, response"):
        data.prepare([p], tmp_path / "t", ByteTokenizer(), loss_on="prompt")


def test_chat_jsonl_through_the_text_cache_and_char_vocab(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"prompt": "ab", "response": "ba"}])
    src = data.open_tokens(p, "char", cache_dir=tmp_path / "cache", loss_on="response")
    assert src.tokenizer.decode(src.tokens.tolist()) == "User: ab\n\nAssistant: ba\n\n"
    assert src.tokenizer.decode(src.tokens[src.mask.astype(bool)].tolist()) == " ba\n\n"
    again = data.open_tokens(p, "char", cache_dir=tmp_path / "cache", loss_on="response")
    assert again.path == src.path and again.mask.tolist() == src.mask.tolist()
    other = data.open_tokens(p, "char", cache_dir=tmp_path / "cache")  # loss_on is in the key
    assert other.path != src.path and other.mask is None


def test_bad_chat_line_in_prepare_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"messages": [{"role": "x", '
                 '"content": "c"}]}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: messages\[0\] has role 'x'"):
        data.prepare([p], tmp_path / "bad", ByteTokenizer())


def test_open_tokens_loss_on(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"prompt": "q", "response": "a"}])
    data.prepare([p], tmp_path / "m", ByteTokenizer(), loss_on="response")
    assert data.open_tokens(tmp_path / "m").mask is not None             # as the data says
    assert data.open_tokens(tmp_path / "m", loss_on="response").mask is not None
    assert data.open_tokens(tmp_path / "m", loss_on="all").mask is None  # train on everything
    data.prepare([p], tmp_path / "n", ByteTokenizer())
    with pytest.raises(DataError, match=r"n\.bin: loss_on='response' needs a loss mask"):
        data.open_tokens(tmp_path / "n", loss_on="response")
    with pytest.raises(DataError, match="loss_on must be one of"):
        data.open_tokens(tmp_path / "n", loss_on="prompts")
    cached = data.open_tokens(p, "bytes", cache_dir=tmp_path / "cache", loss_on="response")
    assert bytes(cached.tokens[cached.mask > 0].tolist()) == b" a\n\n"
    assert data.open_tokens(p, "bytes", cache_dir=tmp_path / "cache").mask is None
