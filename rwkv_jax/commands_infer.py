"""Inference subcommands of ``rwkv-jax``: generate, eval, convert, prepare.

Thin: parse, call the library (:mod:`rwkv_jax.generate`, :mod:`rwkv_jax.evaluate`,
:mod:`rwkv_jax.checkpoint`, :mod:`rwkv_jax.data`), print. ``generate`` writes exactly the
generated text to stdout; every log line goes to stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

from rwkv_jax.cli import command


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"[rwkv-jax] {msg}", file=sys.stderr, flush=True)


def _errors(name: str):
    """Turn the library's input errors into one stderr line and exit status 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args) -> int:
            from rwkv_jax.data import DataError
            from rwkv_jax.state import StateError
            try:
                return fn(args)
            except (StateError, DataError, ValueError, ImportError) as e:
                print(f"rwkv-jax {name}: error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap


# ---- shared: model and tokenizer -------------------------------------------------------------
def _model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    if not positional:
        p.add_argument("--model", required=True,
                       help="checkpoint: run directory, .safetensors or official .pth")
    g = p.add_argument_group("model overrides (passed to rwkv_jax.load)")
    g.add_argument("--ln-x-eps", type=float, help="GroupNorm eps of v5+ ln_x (official 64e-5; "
                                                  "the tiny v5 fixtures need 1e-5)")
    g.add_argument("--compute-dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--param-dtype", choices=("float32", "bfloat16", "float16"))
    g.add_argument("--wkv-impl", help="WKV form, e.g. auto, scan, associative, chunked")


def _overrides(args) -> dict:
    names = ("ln_x_eps", "compute_dtype", "param_dtype", "wkv_impl")
    return {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}


def _load_model(args, path):
    import rwkv_jax
    t0 = time.perf_counter()
    model = rwkv_jax.load(path, **_overrides(args))
    c = model.config
    _log(args, f"loaded {path}: RWKV-{c.version} L{c.n_layer} C{c.n_embd} V{c.vocab_size} "
               f"({c.param_dtype} params, {c.compute_dtype} compute) in "
               f"{time.perf_counter() - t0:.1f}s")
    return model


def resolve_tokenizer(model_path, spec: str | None, vocab_size: int):
    """The tokenizer for a model: ``spec`` (bytes, world, char-free specs or a file), else the
    run directory's ``tokenizer.json``, else inferred from ``vocab_size`` (256 -> bytes,
    65536 -> world). A ``tokenizer.json`` is either an rwkv-jax spec (``{"type": ...}``, what
    training writes) or a Hugging Face tokenizer file."""
    from rwkv_jax.tokenizers import HFTokenizer, get_tokenizer, tokenizer_from_dict

    def from_file(p: pathlib.Path):
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{p}: not a readable tokenizer.json ({e})") from None
        if isinstance(d, dict) and d.get("type") in ("bytes", "char", "world", "hf"):
            return tokenizer_from_dict(d)
        return HFTokenizer(p)

    if spec is not None:
        p = pathlib.Path(spec)
        tok = from_file(p) if p.is_file() and p.suffix == ".json" else get_tokenizer(spec)
    else:
        run_tok = None if model_path is None else pathlib.Path(model_path) / "tokenizer.json"
        tok = (from_file(run_tok) if run_tok is not None and run_tok.is_file()
               else get_tokenizer(None, vocab_size=vocab_size))
    if tok.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {tok.name!r} has {tok.vocab_size} ids, the model only "
                         f"{vocab_size}")
    return tok


def _tokenizer_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", metavar="bytes|world|PATH",
                   help="default: the run directory's tokenizer.json, else by vocab size "
                        "(256: bytes, 65536: world; 50277 needs a tokenizer.json path)")


# ---- generate --------------------------------------------------------------------------------
def _generate_args(p: argparse.ArgumentParser):
    _model_args(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (one completion per prompt)")
    _tokenizer_arg(p)
    s = p.add_argument_group("sampling (ChatRWKV)")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    s.add_argument("--top-p", type=float, default=0.85, help="default 0.85")
    s.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--penalty-decay", type=float, default=0.996)
    s.add_argument("--ban", type=int, action="append", default=[], metavar="TOKEN_ID",
                   help="never generate this token id (repeatable)")
    s.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a completion at this string, not included (repeatable; "
                        "Python escapes such as \\n are understood)")
    s.add_argument("--stop-token", type=int, action="append", metavar="TOKEN_ID",
                   help="end a completion at this token id (default: the tokenizer's end of "
                        "text, 0 for World; none for bytes)")
    s.add_argument("--max-tokens", type=int, default=200)
    s.add_argument("--seed", type=int, default=0,
                   help="random seed; prompt i of a batch uses seed + i, so it gives the same "
                        "text as alone with that seed")
    p.add_argument("--state-in", metavar="FILE", help="continue from a saved state "
                                                      "(.npz/.safetensors; batch 1 or one row "
                                                      "per prompt)")
    p.add_argument("--state-out", metavar="FILE",
                   help="save the state after the prompt and the generated tokens")
    p.add_argument("--jsonl", action="store_true",
                   help="several prompts: print one JSON object per prompt, "
                        '{"index", "prompt", "completion"}, instead of the text blocks')
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")


def _unescape(s: str) -> str:
    return s.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


@_errors("generate")
def _generate(args) -> int:
    """Single prompt: the completion streams to stdout as it is generated (flushed per piece,
    only whole UTF-8 characters), nothing else. Several prompts: after generation, for each
    prompt ``k`` of ``n`` a header line ``=== completion k/n ===`` then the completion and a
    newline (or ``--jsonl``)."""
    from rwkv_jax.generate import Sampling, stream_with_state
    from rwkv_jax.state import load_state, save_state
    if args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        presence_penalty=args.presence_penalty,
                        frequency_penalty=args.frequency_penalty,
                        penalty_decay=args.penalty_decay, banned_tokens=tuple(args.ban))
    model = _load_model(args, args.model)
    tok = resolve_tokenizer(args.model, args.tokenizer, model.config.vocab_size)
    _log(args, f"tokenizer {tok.name} (vocab {tok.vocab_size})")
    state = load_state(args.state_in, model) if args.state_in else None
    prompts = list(args.prompt)
    single = len(prompts) == 1
    out = sys.stdout
    texts = ["" for _ in prompts]
    final, n_steps = state, 0
    t0 = t_first = time.perf_counter()
    for chunk, final in stream_with_state(model, tok, prompts, max_tokens=args.max_tokens,
                                          seed=args.seed, stop=[_unescape(x) for x in args.stop],
                                          stop_tokens=args.stop_token, state=state,
                                          sampling=sampling):
        if n_steps == 0:
            t_first = time.perf_counter()
        n_steps += 1
        for i, piece in enumerate(chunk):
            texts[i] += piece
        if single and chunk[0]:
            out.write(chunk[0])
            out.flush()
    dt = time.perf_counter() - t0
    if not single:
        for i, (p, t) in enumerate(zip(prompts, texts)):
            if args.jsonl:
                out.write(json.dumps({"index": i, "prompt": p, "completion": t},
                                     ensure_ascii=False) + "\n")
            else:
                out.write(f"=== completion {i + 1}/{len(prompts)} ===\n{t}\n")
        out.flush()
    steps = max(n_steps - 1, 1)  # the last yield carries no new token
    decode_dt = max(time.perf_counter() - t_first, 1e-9)
    if single and texts[0] and not args.quiet and out.isatty():
        print(file=sys.stderr)  # the completion has no newline of its own
    _log(args, f"{len(prompts)} prompt(s), up to {steps} steps in {dt:.2f}s "
               f"(first token after {t_first - t0:.2f}s, then {steps / decode_dt:.1f} steps/s)")
    if args.state_out:
        save_state(args.state_out, final, model)
        _log(args, f"state saved to {args.state_out}")
    return 0


_generate.add_arguments = _generate_args
command("generate", "generate text from a checkpoint (streams to stdout)")(_generate)


# ---- eval ----------------------------------------------------------------------------------
def _eval_args(p: argparse.ArgumentParser):
    _model_args(p)
    p.add_argument("--data", required=True,
                   help="text file (loss / perplexity / bits per byte), .jsonl of "
                        '{"text": ...} (LAMBADA last-word accuracy and perplexity), or a '
                        "prepared / binidx token file")
    _tokenizer_arg(p)
    p.add_argument("--ctx-len", type=int, default=1024,
                   help="window length; the state carries across windows (default 1024)")
    p.add_argument("--task", choices=("auto", "text", "lambada"), default="auto",
                   help="auto: lambada for .jsonl, else text")
    p.add_argument("--lambada-prefix", default="auto", metavar="auto|none|ID[,ID...]",
                   help="ids before each LAMBADA context (auto: [0] for World/20B "
                        "vocabularies, none for byte/char models)")
    p.add_argument("--batch-size", type=int, default=16, help="LAMBADA documents per batch")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")


@_errors("eval")
def _eval(args) -> int:
    from rwkv_jax import evaluate
    task = args.task
    if task == "auto":
        task = "lambada" if pathlib.Path(args.data).suffix == ".jsonl" else "text"
    if task == "lambada":  # read and check the data before the (slower) model load
        spec = args.lambada_prefix
        prefix = (None if spec == "auto" else () if spec == "none"
                  else tuple(int(x) for x in spec.split(",")))
        texts = evaluate.read_jsonl_texts(args.data)
    elif not pathlib.Path(args.data).exists():
        raise FileNotFoundError(f"{args.data}: no such file")
    model = _load_model(args, args.model)
    tok = resolve_tokenizer(args.model, args.tokenizer, model.config.vocab_size)
    t0 = time.perf_counter()
    if task == "lambada":
        res = evaluate.lambada(model, tok, texts, prefix=prefix, batch_size=args.batch_size)
        d = {"task": "lambada", **res.to_dict()}
        line = (f"lambada: accuracy {res.accuracy:.4f} ({res.n_correct}/{res.n_docs})  "
                f"perplexity {res.perplexity:.4f}  prefix {list(res.prefix)}")
    else:
        res = evaluate.evaluate_file(model, tok, args.data, ctx_len=args.ctx_len)
        d = {"task": "text", **res.to_dict()}
        line = (f"loss {res.loss:.4f} nats/token  perplexity {res.perplexity:.4f}  "
                f"bits/byte {res.bits_per_byte:.4f}  accuracy {res.accuracy:.4f}  "
                f"({res.n_tokens} tokens, {res.n_bytes} bytes)")
    _log(args, f"evaluated {args.data} ({task}, tokenizer {tok.name}) in "
               f"{time.perf_counter() - t0:.1f}s")
    print(json.dumps(d) if args.json else line)
    return 0


_eval.add_arguments = _eval_args
command("eval", "loss / perplexity / bits per byte of a text, or LAMBADA accuracy of a "
                ".jsonl")(_eval)


# ---- convert -------------------------------------------------------------------------------
def _convert_args(p: argparse.ArgumentParser):
    p.add_argument("input", help="official .pth, .safetensors or run directory")
    p.add_argument("output", help="OUT.pth, OUT.safetensors, or a run directory (an existing "
                                  "directory or a name without suffix): model.safetensors + "
                                  "config.json [+ tokenizer.json]")
    p.add_argument("--names", choices=("official", "hf", "fla"), default="official",
                   help="tensor names to write (hf: Hugging Face transformers RWKV-4, HF "
                        "remote-code RWKV-5/6, flash-linear-attention RWKV-7; fla: "
                        "flash-linear-attention RWKV-6/7)")
    p.add_argument("--tokenizer", metavar="bytes|world|PATH",
                   help="tokenizer.json to write into a run directory (default: the input "
                        "run directory's, else by vocab size where it is unambiguous)")
    _model_args(p, positional=True)
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")


@_errors("convert")
def _convert(args) -> int:
    import rwkv_jax
    src, dst = pathlib.Path(args.input), pathlib.Path(args.output)
    model = _load_model(args, src)
    if dst.suffix in (".pth", ".safetensors"):
        rwkv_jax.save(model, dst, names=args.names)
        print(f"wrote {dst}")
        return 0
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst}: exists and is not a directory")
    if dst.suffix and not dst.is_dir():
        raise ValueError(f"{dst}: unknown output suffix {dst.suffix!r}; use .pth, "
                         ".safetensors, or a directory name without a suffix")
    dst.mkdir(parents=True, exist_ok=True)
    rwkv_jax.save(model, dst / "model.safetensors", names=args.names)
    (dst / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    written = ["model.safetensors", "config.json"]
    tok = None
    try:
        tok = resolve_tokenizer(src if src.is_dir() else None, args.tokenizer,
                                model.config.vocab_size)
    except ValueError as e:
        _log(args, f"no tokenizer.json written ({e})")
    if tok is not None:
        (dst / "tokenizer.json").write_text(json.dumps(tok.to_dict()))
        written.append("tokenizer.json")
    print(f"wrote {dst}/ ({', '.join(written)})")
    return 0


_convert.add_arguments = _convert_args
command("convert", "convert a checkpoint between .pth, .safetensors and run directories")(
    _convert)


# ---- prepare -------------------------------------------------------------------------------
def _prepare_args(p: argparse.ArgumentParser):
    p.add_argument("inputs", nargs="+", metavar="IN",
                   help="text files (each one document) or .jsonl of {\"text\": ...}")
    p.add_argument("--out", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin (token ids) + PREFIX.json (metadata)")
    p.add_argument("--tokenizer", required=True, metavar="bytes|char|world|PATH")
    p.add_argument("--doc-separator", default="auto", metavar="auto|none|ID",
                   help="id after every document (auto: 0 for World/20B, none for bytes/char)")


@_errors("prepare")
def _prepare(args) -> int:
    from rwkv_jax.data import prepare
    sep = args.doc_separator
    sep = "auto" if sep == "auto" else None if sep == "none" else int(sep)
    t0 = time.perf_counter()
    src = prepare(args.inputs, args.out, args.tokenizer, doc_separator=sep)
    print(f"wrote {src.path} + {pathlib.Path(src.path).with_suffix('.json')}: {len(src)} tokens "
          f"({src.tokens.dtype}, tokenizer {src.tokenizer.name if src.tokenizer else '?'}) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


_prepare.add_arguments = _prepare_args
command("prepare", "tokenize text / jsonl files into a token file for training or eval")(
    _prepare)
