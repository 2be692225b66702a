"""Generation: greedy parity with the official package, batching, streaming, sampling
options, state files, the ``generate`` CLI.

Every model here has the shape of the rwkv4 fixture (L4 C128 V256, F256), so all tests share
one set of compiled prefill/decode functions.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rwkv_jax
from rwkv_jax.checkpoint import model_tensors
from rwkv_jax.cli import main
from rwkv_jax.generate import (
    Sampling,
    decode_step,
    generate,
    generate_tokens,
    prefill,
    sample_logits,
    stream,
)
from rwkv_jax.state import StateError, load_state, save_state
from rwkv_jax.tokenizers import ByteTokenizer
from compile_count import CompileCounter

HERE = pathlib.Path(__file__).resolve().parent
GREEDY = json.loads((HERE / "fixtures_greedy.json").read_text())
OVERRIDES = {"rwkv5.1-tiny-730k": {"ln_x_eps": 1e-5}, "rwkv5.2-tiny-730k": {"ln_x_eps": 1e-5}}
STEMS = ["rwkv4-tiny-660k", "rwkv5.1-tiny-730k", "rwkv5.2-tiny-730k", "rwkv6-tiny-3m",
         "rwkv7-tiny-834k"]
CFG = rwkv_jax.RWKVConfig(version="4", vocab_size=256, n_layer=4, n_embd=128, ffn_dim=256)
BYTES = ByteTokenizer()


@pytest.fixture(scope="module")
def model4(fixtures_dir):
    return rwkv_jax.load(fixtures_dir / "rwkv4-tiny-660k.pth")


def with_tensors(model, tensors):
    """A copy of ``model`` with some parameters replaced, by official key (no re-init)."""
    model = nnx.clone(model)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = ".".join(str(p) for p in path)
        if key in tensors:
            var.set_value(jnp.asarray(tensors[key], jnp.float32))
    return model


@pytest.fixture(scope="module")
def base_model():
    return rwkv_jax.RWKV(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def rand_model(base_model):
    """Random Gaussian matrices in the fixture's shape: peaked logits that depend on the whole
    context (a freshly initialised model predicts nearly uniformly, whatever the prompt)."""
    rng = np.random.default_rng(0)
    t = model_tensors(base_model)
    return with_tensors(base_model, {
        k: rng.standard_normal(v.shape) * (4.0 if k == "head.weight" else 1.0) / np.sqrt(v.shape[1])
        for k, v in t.items() if v.ndim == 2})


# A model that greedily cycles "é€😀" byte by byte: every block's output is zeroed, so the
# logits depend on the last token only (emb one-hot -> ln0 -> ln_out -> head).
CYCLE = "é€😀".encode()
SUCC = {ord("a"): CYCLE[0], **{CYCLE[i]: CYCLE[(i + 1) % len(CYCLE)] for i in range(len(CYCLE))}}


@pytest.fixture(scope="module")
def cycle_model(base_model, tmp_path_factory):
    t = {}
    for k, v in model_tensors(base_model).items():
        if k.endswith(("att.output.weight", "ffn.value.weight")):
            t[k] = np.zeros_like(v)
        elif ".ln" in k or k.startswith("ln_out"):
            t[k] = np.ones_like(v) if k.endswith("weight") else np.zeros_like(v)
    emb = np.zeros((CFG.vocab_size, CFG.n_embd), np.float32)
    head = np.zeros((CFG.vocab_size, CFG.n_embd), np.float32)
    for slot, (tok, nxt) in enumerate(SUCC.items()):
        emb[tok, slot] = 1.0
        head[nxt, slot] = 10.0
    model = with_tensors(base_model, {**t, "emb.weight": emb, "head.weight": head})
    path = tmp_path_factory.mktemp("cycle") / "cycle.safetensors"
    rwkv_jax.save(model, path)
    return model, path


# ---- parity with the official package ----------------------------------------------------
@pytest.mark.parametrize("stem", STEMS)
def test_greedy_matches_official(fixtures_dir, stem):
    ref = GREEDY["models"][stem]
    model = rwkv_jax.load(fixtures_dir / f"{stem}.pth", **OVERRIDES.get(stem, {}))
    toks = [int(t[0]) for t, _ in generate_tokens(model, [GREEDY["prompt"]],
                                                  max_tokens=len(ref["tokens"]),
                                                  sampling=Sampling(temperature=0))]
    diff = [i for i, (a, b) in enumerate(zip(toks, ref["tokens"])) if a != b]
    assert not diff, (f"first difference at step {diff[0]} (official top-2 margin there "
                      f"{ref['margins'][diff[0]]}, smallest {ref['min_margin']})")


def test_greedy_text_api(model4):
    ref = GREEDY["models"]["rwkv4-tiny-660k"]
    text = generate(model4, BYTES, GREEDY["prompt_text"], max_tokens=16, temperature=0)
    assert text.encode() == bytes(ref["tokens"][:16])


# ---- compilation ---------------------------------------------------------------------------
def test_decode_step_compiles_once(rand_model):
    generate(rand_model, BYTES, "Hi", max_tokens=3, temperature=0)
    generate(rand_model, BYTES, "Hi", max_tokens=3, temperature=0.7, seed=1)
    generate(rand_model, BYTES, "Hello there", max_tokens=3, temperature=0)
    # a penalty makes the step count tokens: one more program, once
    generate(rand_model, BYTES, "Hi", max_tokens=3, temperature=0.7, presence_penalty=0.1)
    n = decode_step._cache_size()
    # more tokens, other prompts of seen lengths and every other sampling value: nothing new
    with CompileCounter() as c:
        generate(rand_model, BYTES, "Hello world", max_tokens=12, temperature=0,
                 banned_tokens=(32,))
        generate(rand_model, BYTES, "Ho", max_tokens=12, temperature=1.3, top_p=0.5, top_k=7,
                 presence_penalty=0.4, frequency_penalty=0.2, penalty_decay=0.9, seed=5)
    assert decode_step._cache_size() == n
    assert c.compiles == 0


# ---- batching ------------------------------------------------------------------------------
PROMPTS = ["First Citizen:\n", "We are accounted poor", "A"]


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "top_p": 0.9}],
                         ids=["greedy", "seeded"])
def test_batch_equals_alone(rand_model, sampling):
    together = [[] for _ in PROMPTS]
    for chunk in stream(rand_model, BYTES, PROMPTS, max_tokens=12, seed=3, **sampling):
        for i, c in enumerate(chunk):
            together[i].append(c)
    # row i samples with seed 3 + i
    alone = [generate(rand_model, BYTES, p, max_tokens=12, seed=3 + i, **sampling)
             for i, p in enumerate(PROMPTS)]
    assert ["".join(t) for t in together] == alone
    assert len(set(alone)) == len(alone)


def test_repeated_prompt_gives_different_samples(rand_model):
    texts = ["", ""]
    for chunk in stream(rand_model, BYTES, ["Hi", "Hi"], max_tokens=24, seed=0):
        texts = [t + c for t, c in zip(texts, chunk)]
    assert texts[0] != texts[1]


def test_prefill_chunks_equal_one_pass(rand_model):
    ids = list(b"The quick brown fox jumps over the lazy dog")  # 43 = 32 + 8 + 2 + 1
    logits, state = prefill(rand_model, [ids])
    ref_logits, ref_state = rand_model(jnp.asarray([ids], jnp.int32))
    np.testing.assert_allclose(logits, ref_logits[:, -1], atol=1e-4, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


# ---- sampling options ----------------------------------------------------------------------
def _tokens(model, prompt, n, **sampling):
    return [int(t[0]) for t, _ in generate_tokens(model, [list(prompt.encode())], max_tokens=n,
                                                  sampling=Sampling(**sampling), seed=7)]


def test_top_k_1_is_greedy(rand_model):
    assert _tokens(rand_model, "Hi", 12, temperature=1.0, top_k=1) == _tokens(
        rand_model, "Hi", 12, temperature=0)


def test_banned_tokens_never_appear(rand_model):
    free = _tokens(rand_model, "Hi", 24, temperature=1.0, top_p=1.0)
    ban = tuple(sorted(set(free)))
    toks = _tokens(rand_model, "Hi", 24, temperature=1.0, top_p=1.0, banned_tokens=ban)
    assert not set(toks) & set(ban)
    greedy = _tokens(rand_model, "Hi", 12, temperature=0, banned_tokens=ban)
    assert not set(greedy) & set(ban)


def test_penalties_change_output_deterministically(model4):
    plain = _tokens(model4, "First Citizen:\n", 12, temperature=0)
    assert set(plain) == {32}  # this model's greedy output is all spaces
    pen = {"temperature": 0, "presence_penalty": 1.0, "frequency_penalty": 0.5}
    a, b = _tokens(model4, "First Citizen:\n", 12, **pen), _tokens(model4, "First Citizen:\n",
                                                                    12, **pen)
    assert a == b and a != plain and len(set(a)) > 1


def test_sample_logits_function():
    logits = jnp.asarray([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 5.0]], jnp.float32)
    key = jax.random.PRNGKey(0)
    assert sample_logits(logits, key, Sampling(temperature=0)).tolist() == [1, 3]
    assert sample_logits(logits, key, Sampling(top_p=1e-3)).tolist() == [1, 3]
    assert sample_logits(logits, key, Sampling(temperature=0, banned_tokens=(1, 3))).tolist() \
        == [2, 0]
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0)


@pytest.mark.parametrize("scale", [8.0, 0.05])  # a peaked row (prefix path), a flat one
@pytest.mark.parametrize("top_p, top_k", [(0.5, 0), (0.9, 5), (0.95, 300), (1.0, 0)])
def test_nucleus_prefix_matches_the_whole_sort(monkeypatch, scale, top_p, top_k):
    """The top-k prefix cut-offs draw exactly what sorting the whole vocabulary draws: where
    the nucleus fits in the prefix, and where it does not (the fallback)."""
    gen = importlib.import_module("rwkv_jax.generate")
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((3, 2000)) * scale, jnp.float32)
    s = Sampling(temperature=1.0, top_p=top_p, top_k=top_k)
    keys = [jax.random.PRNGKey(i) for i in range(40)]
    fast = [sample_logits(logits, k, s).tolist() for k in keys]
    monkeypatch.setattr(gen, "NUCLEUS_PREFIX", 10 ** 9)
    whole = [sample_logits(logits, k, s).tolist() for k in keys]
    assert fast == whole
    # and the draws respect the cut-offs: top_k, and the nucleus of sorted probabilities
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    for row in range(3):
        drawn = {t[row] for t in fast}
        order = np.argsort(-probs[row])
        n_nucleus = int(np.searchsorted(np.cumsum(probs[row][order]), top_p * (1 - 1e-6))) + 1
        allowed = set(order[:min(n_nucleus, top_k or 2000)].tolist())
        assert drawn <= allowed


# ---- stop strings and streaming ----------------------------------------------------------
def test_stop_strings(cycle_model):
    model, _ = cycle_model
    assert generate(model, BYTES, "a", max_tokens=18, temperature=0) == "é€😀" * 2
    assert generate(model, BYTES, "a", max_tokens=40, temperature=0, stop=["😀"]) == "é€"
    assert generate(model, BYTES, "a", max_tokens=40, temperature=0, stop=["€😀é€"]) == "é"
    assert generate(model, BYTES, "a", max_tokens=40, temperature=0,
                    stop=["x", "😀é"]) == "é€"
    # a stop token ends the row without being part of the text
    assert generate(model, BYTES, "a", max_tokens=40, temperature=0,
                    stop_tokens=[CYCLE[2]]) == "é"
    # max_tokens in the middle of a character: the partial character becomes U+FFFD
    assert generate(model, BYTES, "a", max_tokens=4, temperature=0) == "é\ufffd"


class _Recorder:
    def __init__(self):
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return len(s)

    def flush(self):
        pass

    def isatty(self):
        return False


def test_cli_streams_whole_characters(cycle_model, monkeypatch, capsys):
    _, path = cycle_model
    rec = _Recorder()
    monkeypatch.setattr("sys.stdout", rec)
    assert main(["generate", "--model", str(path), "--prompt", "a", "--temperature", "0",
                 "--max-tokens", "27"]) == 0
    assert "".join(rec.writes) == "é€😀" * 3
    assert len(rec.writes) == 9  # streamed: one write per completed character
    assert "[rwkv-jax]" in capsys.readouterr().err  # logs on stderr only


def test_cli_stdout_exact_and_stop(cycle_model, capsysbinary):
    _, path = cycle_model
    assert main(["generate", "--model", str(path), "--prompt", "a", "--temperature", "0",
                 "--max-tokens", "40", "--stop", "😀", "-q"]) == 0
    out = capsysbinary.readouterr()
    assert out.out == "é€".encode() and out.err == b""


def test_cli_several_prompts(cycle_model, capsys):
    _, path = cycle_model
    args = ["generate", "--model", str(path), "--prompt", "a", "--prompt", "aé€",
            "--temperature", "0", "--max-tokens", "4", "-q"]
    assert main(args) == 0
    assert capsys.readouterr().out == ("=== completion 1/2 ===\né\ufffd\n"
                                       "=== completion 2/2 ===\n😀\n")
    assert main(args + ["--jsonl"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["completion"] for r in rows] == ["é\ufffd", "😀"] and rows[1]["prompt"] == "aé€"


def _retag(path, **changes):
    """Rewrite a state file's header (cheaper than building another model)."""
    with np.load(path) as z:
        arrays = dict(z)
    header = {**json.loads(str(arrays.pop("__header__"))), **changes}
    with open(path, "wb") as f:
        np.savez(f, __header__=np.array(json.dumps(header)), **arrays)
    return path


def test_cli_errors(cycle_model, tmp_path, capsys):
    model, path = cycle_model
    assert main(["generate", "--model", str(path), "--prompt", "a", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    bad = _retag(save_state(tmp_path / "s.npz", model.init_state(1), model), n_layer=2)
    assert main(["generate", "--model", str(path), "--prompt", "a", "--state-in",
                 str(bad)]) == 2
    assert "n_layer: file 2, model 4" in capsys.readouterr().err


# ---- state files ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_state_round_trip_continues_identically(rand_model, tmp_path, suffix):
    prompt = list(b"First Citizen:\n")
    steps = list(generate_tokens(rand_model, [prompt], max_tokens=6,
                                 sampling=Sampling(temperature=0.8), seed=2))
    generated, state = [int(t[0]) for t, _ in steps], steps[-1][1]
    path = save_state(tmp_path / f"state{suffix}", state, rand_model)
    loaded = load_state(path, rand_model)
    assert jax.tree.structure(loaded) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state)):
        np.testing.assert_array_equal(a, b)
    kw = {"max_tokens": 10, "seed": 4, "temperature": 0.8}
    cont = generate(rand_model, BYTES, " Speak", state=loaded, **kw)
    assert cont == generate(rand_model, BYTES, " Speak", state=state, **kw)
    # the state holds the prompt and every generated token: the same as one long prompt
    whole = [int(t[0]) for t, _ in generate_tokens(
        rand_model, [prompt + generated + list(b" Speak")], max_tokens=10,
        sampling=Sampling(temperature=0))]
    again = [int(t[0]) for t, _ in generate_tokens(
        rand_model, [list(b" Speak")], max_tokens=10, sampling=Sampling(temperature=0),
        state=loaded)]
    assert again == whole


def test_state_errors(rand_model, tmp_path):
    path = _retag(save_state(tmp_path / "s.npz", rand_model.init_state(2), rand_model),
                  n_layer=2, n_embd=64)
    with pytest.raises(StateError, match=r"n_layer: file 2, model 4\n  n_embd: file 64"):
        load_state(path, rand_model)
    arrays = dict(np.load(save_state(tmp_path / "good.npz", rand_model.init_state(2), rand_model)))
    arrays["0.att_x_prev"] = np.zeros((2, 7), np.float32)
    del arrays["3.ffn_x_prev"]
    np.savez(tmp_path / "shapes.npz", **arrays)
    _retag(tmp_path / "shapes.npz")
    with pytest.raises(StateError, match=r"missing arrays: 3.ffn_x_prev\n  0.att_x_prev: "
                                         r"shape \(2, 7\), expected \(2, 128\)"):
        load_state(tmp_path / "shapes.npz", rand_model)
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(StateError, match="no rwkv-jax state header"):
        load_state(tmp_path / "junk.npz", rand_model)
    with pytest.raises(StateError, match="no such state file"):
        load_state(tmp_path / "missing.npz", rand_model)
    with pytest.raises(StateError, match="suffix"):
        save_state(tmp_path / "s.txt", rand_model.init_state(1), rand_model)


def test_cli_state_out_then_in(rand_model, tmp_path, capsys):
    path = tmp_path / "rand.safetensors"
    rwkv_jax.save(rand_model, path)
    st = tmp_path / "st.npz"
    base = ["generate", "--model", str(path), "--temperature", "0", "-q"]
    assert main(base + ["--prompt", "First", "--max-tokens", "5", "--state-out", str(st)]) == 0
    first = capsys.readouterr().out
    assert main(base + ["--prompt", " Citizen", "--max-tokens", "5", "--state-in", str(st)]) == 0
    second = capsys.readouterr().out
    _, state = generate(rand_model, BYTES, "First", max_tokens=5, temperature=0,
                        return_state=True)
    assert second == generate(rand_model, BYTES, " Citizen", max_tokens=5, temperature=0,
                              state=state)
    assert first == generate(rand_model, BYTES, "First", max_tokens=5, temperature=0)


# ---- several streams in one batch ------------------------------------------------------------
def test_num_samples_streams_equal_alone(rand_model):
    """num_samples=3 of two prompts decode as one batch of 6 streams; stream i*3+j is the
    prompt alone with seed + (i*3+j), and the samples of one prompt differ."""
    prompts = ["Hi", "Hello"]
    together = generate(rand_model, BYTES, prompts, num_samples=3, max_tokens=10, seed=5,
                        temperature=1.0, top_p=0.95)
    assert len(together) == 6
    alone = [generate(rand_model, BYTES, p, max_tokens=10, seed=5 + i * 3 + j,
                      temperature=1.0, top_p=0.95)
             for i, p in enumerate(prompts) for j in range(3)]
    assert together == alone
    assert len(set(together[:3])) > 1


def test_per_stream_sampling_is_respected(rand_model):
    """One batch, one Sampling per stream: each stream equals that setting run alone."""
    settings = [Sampling(temperature=0), Sampling(temperature=1.2, top_p=0.5),
                Sampling(temperature=0, banned_tokens=(32, 101)),
                Sampling(temperature=0.9, top_k=3, presence_penalty=0.5)]
    together = generate(rand_model, BYTES, ["Once"] * 4, sampling=settings, max_tokens=12,
                        seed=9)
    alone = [generate(rand_model, BYTES, "Once", sampling=s, max_tokens=12, seed=9 + i)
             for i, s in enumerate(settings)]
    assert together == alone
    assert together[0] != together[2] or " " not in together[0]


def test_cli_num_samples(tmp_path, cycle_model, capsys):
    _, path = cycle_model
    assert main(["generate", "--model", str(path), "--prompt", "a", "--num-samples", "3",
                 "--max-tokens", "4", "--temperature", "0", "--jsonl", "-q"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (0, 2)]
    assert len({r["completion"] for r in rows}) == 1  # greedy: all three the same
