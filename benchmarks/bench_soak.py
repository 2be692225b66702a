"""One process, every fixture, many calls: memory must stay flat (the public call's soak test).

Loads the RWKV-4, 5.1, 5.2, 6 and 7 fixtures (``--fixtures``) and, for ``--rounds`` rounds,
runs three prompts of 59, 500 and 2048 bytes through each the way a user would:

* whole: ``model(prompt)``;
* split: ``model(prefix)`` then ``model(rest, state)`` at a cut that moves every round;
* step: 24 single-token calls carrying the state.

After every round it prints the process's resident memory, its peak, and its memory-mapping
count (Linux's ``vm.max_map_count`` default is 65530; the landed code before the model-API
fix exhausted it within minutes). The first round compiles; later rounds must not grow. ::

    python benchmarks/bench_soak.py --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

TEXT = (b"First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        b"First Citizen: You are all resolved rather to die than to famish? ") * 16
LN_X_EPS = {"rwkv5.1": 1e-5, "rwkv5.2": 1e-5}


def _rss_maps() -> tuple[float, int]:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    with open("/proc/self/maps") as f:
        return rss, sum(1 for _ in f)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", default=_common.FIXTURES)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    import rwkv_jax
    models = {}
    for f in sorted(os.listdir(args.fixtures)):
        if f.endswith(".pth"):
            stem = f[:-4]
            kw = {"ln_x_eps": e for k, e in LN_X_EPS.items() if stem.startswith(k)}
            models[stem] = rwkv_jax.load(os.path.join(args.fixtures, f), **kw)
    prompts = [np.frombuffer(TEXT[:n], np.uint8).astype(np.int32)[None] for n in (59, 500, 2048)]
    print(f"fixtures: {', '.join(models)}; prompts of 59, 500, 2048 bytes; "
          f"{_common.load_line()}")
    rows = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        calls = 0
        for model in models.values():
            for x in prompts:
                model(x)
                cut = 1 + (17 * r + 5) % (x.shape[1] - 1)
                _, state = model(x[:, :cut])
                logits, state = model(x[:, cut:], state, logits_to_keep=1)
                for t in range(24):
                    logits, state = model(x[:, t:t + 1], state)
                np.asarray(logits)
                calls += 27
        rss, maps = _rss_maps()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        rows.append([r, calls, f"{time.perf_counter() - t0:.1f}", f"{rss:.0f}", f"{peak:.0f}",
                     maps])
        print(f"round {r}: {calls} calls, RSS {rss:.0f} MB, peak {peak:.0f} MB, {maps} maps",
              file=sys.stderr, flush=True)
    print(_common.markdown_table(["round", "calls", "seconds", "RSS MB", "peak RSS MB",
                                  "memory maps"], rows))


if __name__ == "__main__":
    main()
