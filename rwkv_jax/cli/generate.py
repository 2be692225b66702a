"""``rwkv-jax generate``: sample from a checkpoint; exactly the generated text on stdout.

Single prompt: the completion streams to stdout as it is generated (flushed per piece, only
whole UTF-8 characters), nothing else. Several prompts: after generation, for each prompt
``k`` of ``n`` a header line ``=== completion k/n ===`` then the completion and a newline (or
``--jsonl``). Every log line goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from rwkv_jax.cli.args import (add_model_args, add_quiet_arg, add_tokenizer_arg, existing_file,
                               finite_float, float_in, int_at_least, log)

HELP = "generate text from a checkpoint (streams to stdout)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch (one completion per prompt)")
    add_tokenizer_arg(p)
    s = p.add_argument_group("sampling (ChatRWKV)")
    s.add_argument("--temperature", type=float_in(0, name="temperature"), default=1.0,
                   help="0 = greedy (default 1.0)")
    s.add_argument("--top-p", type=float_in(0, 1, lo_open=True, name="top_p"),
                   default=0.85,
                   help="in (0, 1] (default 0.85)")
    s.add_argument("--top-k", type=int_at_least(0, "top_k"), default=0, help="0 = off (default)")
    s.add_argument("--presence-penalty", type=finite_float, default=0.0)
    s.add_argument("--frequency-penalty", type=finite_float, default=0.0)
    s.add_argument("--penalty-decay", type=float_in(0, 1, name="penalty_decay"),
                   default=0.996,
                   help="in [0, 1] (default 0.996)")
    s.add_argument("--ban", type=int_at_least(0), action="append", default=[],
                   metavar="TOKEN_ID", help="never generate this token id (repeatable)")
    s.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a completion at this string, not included (repeatable; "
                        "Python escapes such as \\n are understood)")
    s.add_argument("--stop-token", type=int_at_least(0), action="append", metavar="TOKEN_ID",
                   help="end a completion at this token id (default: the tokenizer's end of "
                        "text, 0 for World; none for bytes)")
    s.add_argument("--max-tokens", type=int_at_least(0), default=200)
    s.add_argument("--seed", type=int, default=0,
                   help="random seed; stream i of a batch uses seed + i, so it gives the same "
                        "text as alone with that seed")
    s.add_argument("--num-samples", type=int_at_least(1), default=1, metavar="N",
                   help="N completions of each prompt, all decoded together in one batch "
                        "(default 1)")
    p.add_argument("--state-in", metavar="FILE", type=existing_file,
                   help="continue from a saved state (.npz/.safetensors; batch 1 or one row "
                        "per prompt)")
    p.add_argument("--state-out", metavar="FILE",
                   help="save the state after the prompt and the generated tokens")
    p.add_argument("--jsonl", action="store_true",
                   help="several streams: print one JSON object per stream, "
                        '{"index", "sample", "prompt", "completion"}, instead of the text '
                        "blocks")
    add_quiet_arg(p)


def _unescape(s: str) -> str:
    try:
        return s.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    except UnicodeError as e:
        raise ValueError(f"--stop {s!r}: bad escape ({e.reason})") from None


def run(args: argparse.Namespace) -> int:
    from rwkv_jax.cli.common import fit_tokenizer, given_tokenizer, load_model
    from rwkv_jax.cli.errors import check_interrupted
    from rwkv_jax.generate import Sampling, stream_with_state
    from rwkv_jax.state import load_state, save_state
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        presence_penalty=args.presence_penalty,
                        frequency_penalty=args.frequency_penalty,
                        penalty_decay=args.penalty_decay, banned_tokens=tuple(args.ban))
    stop = [_unescape(x) for x in args.stop]
    tok = given_tokenizer(args.model, args.tokenizer)  # a bad --tokenizer fails before the load
    model = load_model(args, args.model)
    tok = fit_tokenizer(tok, model.config.vocab_size)
    log(args, f"tokenizer {tok.name} (vocab {tok.vocab_size})")
    state = load_state(args.state_in, model) if args.state_in else None
    n = args.num_samples
    prompts = [p for p in args.prompt for _ in range(n)]  # stream i*n + j: sample j of prompt i
    single = len(prompts) == 1
    out = sys.stdout
    texts = ["" for _ in prompts]
    final, n_steps = state, 0
    t0 = t_first = time.perf_counter()
    for chunk, final in stream_with_state(model, tok, prompts, max_tokens=args.max_tokens,
                                          seed=args.seed, stop=stop,
                                          stop_tokens=args.stop_token, state=state,
                                          sampling=sampling):  # one batched decode step
        check_interrupted()  # a Ctrl-C swallowed inside a library callback still stops us
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
                out.write(json.dumps({"index": i // n, "sample": i % n, "prompt": p,
                                      "completion": t}, ensure_ascii=False) + "\n")
            else:
                out.write(f"=== completion {i + 1}/{len(prompts)} ===\n{t}\n")
        out.flush()
    steps = max(n_steps - 1, 1)  # the last yield carries no new token
    decode_dt = max(time.perf_counter() - t_first, 1e-9)
    if single and texts[0] and not args.quiet and out.isatty():
        print(file=sys.stderr)  # the completion has no newline of its own
    log(args, f"{len(prompts)} prompt(s), up to {steps} steps in {dt:.2f}s "
              f"(first token after {t_first - t0:.2f}s, then {steps / decode_dt:.1f} steps/s)")
    if args.state_out:
        save_state(args.state_out, final, model)
        log(args, f"state saved to {args.state_out}")
    return 0
