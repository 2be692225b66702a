"""Time to first token through the public call, against the official ``rwkv`` package, one run.

For prompts of ``--lengths`` tokens (default 10, 100, 1000, 5000), the time from the prompt to
its last position's logits, after warm-up:

* ``rwkv_jax``: ``model = rwkv_jax.load(path)``, then
  ``logits, state = model(prompt [1, n], logits_to_keep=1)`` (eager; the prompt runs in the
  fixed chunk lengths of ``PREFILL_SIZES``, so the warm-up compiles at most six programs and
  a new length compiles nothing: the compiles during the timed calls are counted and printed);
* ``official``: ``model.forward(prompt, None)`` (strategy "cpu fp32", TorchScript on), which
  prefills in one call and returns the last logits.

The model is a random checkpoint of ``--shape`` L,C,V (official RWKV-4 keys, the file
bench_inference.py writes; default the 169M shape). Each length is timed ``--repeats``
times, the implementations alternating; the median is reported. Then, in the JAX worker,
``--leak-calls`` single-token calls carrying the state, with the process's resident memory
and memory-mapping count before and after (they must stay flat). Threads: ``--threads``
(default 1: ``taskset -c 0`` and single-threaded XLA / torch). ::

    python benchmarks/bench_ttft.py --json out/ttft.json
    python benchmarks/bench_ttft.py --shape 2,64,256 --lengths 10,100 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def _rss_and_maps() -> tuple[float, int]:
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return rss_pages * os.sysconf("SC_PAGE_SIZE") / 2**20, maps


class JaxRunner:
    def __init__(self, args):
        import jax

        import rwkv_jax
        self.model = rwkv_jax.load(args.ckpt)
        self.V = self.model.config.vocab_size
        self.compiles = 0
        jax.monitoring.register_event_duration_secs_listener(self._count)
        for n in args.lengths:  # warm-up: every chunk program these lengths need
            self.prefill(n=n)
        self.info = {"jax": jax.__version__}

    def _count(self, event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            self.compiles += 1

    def prefill(self, n):
        tokens = np.asarray([_common.token_ids(n, self.V, n)], np.int32)
        logits, _ = self.model(tokens, logits_to_keep=1)
        return float(np.asarray(logits)[0, -1, 0])

    def compile_count(self):
        return self.compiles

    def leak_check(self, calls):
        state, tok = None, np.asarray([[1]], np.int32)
        for _ in range(50):  # the single-token program, compiled before the count starts
            _, state = self.model(tok, state)
        before = _rss_and_maps()
        for _ in range(calls):
            logits, state = self.model(tok, state)
        np.asarray(logits)
        after = _rss_and_maps()
        return {"calls": calls, "rss_mb": [before[0], after[0]], "maps": [before[1], after[1]]}


class OfficialRunner:
    def __init__(self, args):
        import torch
        torch.set_num_threads(args.threads)
        from rwkv.model import RWKV
        self.model = RWKV(model=args.ckpt[:-4], strategy="cpu fp32", verbose=False)
        self.V = args.vocab
        for n in args.lengths:
            self.prefill(n=n)
        self.info = {"torch": torch.__version__, "rwkv": _common._version("rwkv")}

    def prefill(self, n):
        logits, _ = self.model.forward(_common.token_ids(n, self.V, n), None)
        return float(logits[0])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="12,768,50277", help="L,C,V (default: 169M shape)")
    p.add_argument("--lengths", default="10,100,1000,5000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--leak-calls", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "rwkv_jax_bench"))
    p.add_argument("--official-python", default=_common.OFFICIAL_PYTHON)
    p.add_argument("--jax-python", default=sys.executable)
    p.add_argument("--json")
    p.add_argument("--worker", choices=["jax", "official"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    if args.worker:
        return _common.serve(lambda: (JaxRunner if args.worker == "jax" else
                                      OfficialRunner)(args))
    L, C, V = (int(x) for x in args.shape.split(","))
    ckpt = _common.checkpoint_path(args.cache_dir, L, C, V, 0)
    common = ["--ckpt", ckpt, "--vocab", str(V), "--lengths", ",".join(map(str, args.lengths))]
    pin = not args.no_pin
    workers = {name: _common.spawn_worker(__file__, py, name, common, threads=args.threads,
                                          pin=pin)
               for name, py in (("jax", args.jax_python), ("official", args.official_python))}
    for w in workers.values():
        w.info = w.recv()["info"]
    compiles0 = workers["jax"].request(op="compile_count")["result"]
    times = {(name, n): [] for name in workers for n in args.lengths}
    for _ in range(args.repeats):
        for n in args.lengths:
            for name, w in workers.items():
                times[(name, n)].append(w.request(op="prefill", args={"n": n}, timed=True)["wall"])
    new_compiles = workers["jax"].request(op="compile_count")["result"] - compiles0
    leak = workers["jax"].request(op="leak_check", args={"calls": args.leak_calls})["result"] if args.leak_calls else None
    for w in workers.values():
        w.close()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"time to first token, RWKV-4 L{L} C{C} V{V} (random official checkpoint), "
          f"threads={args.threads}, median of {args.repeats}; {_common.load_line()}")
    print(_common.format_env(_common.env_info()))
    rows = [[n, f"{med[('jax', n)] * 1e3:.1f}", f"{med[('official', n)] * 1e3:.1f}",
             _common.ratio(med[("official", n)], med[("jax", n)])] for n in args.lengths]
    print(_common.markdown_table(["prompt tokens", "rwkv_jax ms", "official ms",
                                  "speed-up (official / rwkv_jax)"], rows))
    print(f"\ncompiles during the timed rwkv_jax calls (new lengths included): {new_compiles}")
    if leak:
        print(f"{leak['calls']} single-token calls: RSS {leak['rss_mb'][0]:.0f} -> "
              f"{leak['rss_mb'][1]:.0f} MB, memory mappings {leak['maps'][0]} -> "
              f"{leak['maps'][1]}")
    if args.json:
        _common.write_json(args.json, {"args": vars(args), "median_s": {
            f"{k[0]}:{k[1]}": v for k, v in med.items()}, "compiles": new_compiles,
            "leak": leak})


if __name__ == "__main__":
    main()
