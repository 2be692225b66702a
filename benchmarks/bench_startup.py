"""Start-up costs on CPU, each measured as a user meets it, one run:

1. **Generate from a cold start**, per fixture in ``--fixtures`` (default the tiny official
   .pth files), alternating round by round:

   * ``import``: ``python -c "import jax, flax"`` (the floor any JAX program pays);
   * ``rwkv-jax cold``: ``rwkv-jax generate --model FIXTURE --prompt PROMPT --max-tokens 32
     --temperature 0`` with an empty persistent compilation cache;
   * ``rwkv-jax warm``: the same command again on the cache the cold run filled;
   * ``official``: the official package's equivalent script in its own interpreter
     (import torch and rwkv, load the .pth with strategy "cpu fp32", the prompt's bytes,
     32 greedy tokens);
   * ``floor`` (``--floor``): ``_startup_floor.py run``, the same two programs the warm CLI
     runs, serialized ahead of time and loaded with no model, tracing or lowering: what a
     warm run with two programs cannot go below (its text must equal the CLI's).

   The persistent cache: ``JAX_COMPILATION_CACHE_DIR`` (a fresh directory per round) and
   ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`` in the CLI's environment
   (``--no-cache-env``: leave the environment alone, for a CLI that enables its own cache;
   then "cold" is only cold if that cache is empty). Wall time of each process is reported,
   plus the CLI's own "first token after X s" (stderr), and warm generate / import time
   (target <= 1.6x).
2. **Preset build**: ``rwkv_jax.RWKV(RWKVConfig.preset(NAME), rngs=nnx.Rngs(0))`` for each
   of ``--presets`` (default rwkv7-0.1b and rwkv4-169m; target <= 5 s for 0.1B), each in a
   fresh process (what a user's first build costs, compiles included): wall and CPU seconds
   (CPU counts every thread), peak RSS, RSS before the build and the parameter bytes.

Nothing is pinned by default (start-up as a user sees it); ``--threads 1`` pins every process
to core 0 with one XLA / torch thread. ::

    python benchmarks/bench_startup.py --json out/startup.json
    python benchmarks/bench_startup.py --rounds 1 --fixtures-only rwkv4-tiny-660k \\
        --presets rwkv4-169m                                          # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

PROMPT = "First Citizen:"
MAX_TOKENS = 32
FIRST_TOKEN = re.compile(r"first token after ([0-9.]+)\s*s")

OFFICIAL_SCRIPT = r"""
import os, sys, time
path, prompt, n, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if os.path.basename(path).startswith("rwkv7"):
    os.environ["RWKV_V7_ON"] = "1"
import torch
if threads:
    torch.set_num_threads(threads)
from rwkv.model import RWKV
kw = {} if os.path.basename(path).startswith("rwkv7") else {"verbose": False}
model = RWKV(model=path[:-4], strategy="cpu fp32", **kw)
logits, state = model.forward(list(prompt.encode()), None)
out = []
for _ in range(n):
    tok = int(torch.argmax(logits))
    out.append(tok)
    logits, state = model.forward([tok], state)
sys.stdout.write(bytes(t for t in out if t < 256).decode("utf-8", "replace"))
"""

BUILD_SCRIPT = r"""
import json, resource, sys, time
t_import = time.perf_counter()
import jax
from flax import nnx
import rwkv_jax
jax.numpy.zeros(1).block_until_ready()
t_import = time.perf_counter() - t_import
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cfg = rwkv_jax.RWKVConfig.preset(sys.argv[1])
c0, t0 = time.process_time(), time.perf_counter()
model = rwkv_jax.RWKV(cfg, rngs=nnx.Rngs(0))
leaves = jax.tree.leaves(nnx.state(model))
jax.block_until_ready(leaves)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"build_s": wall, "build_cpu_s": cpu, "import_s": t_import,
                  "rss_before": rss0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "param_bytes": sum(x.size * x.dtype.itemsize for x in leaves),
                  "params": sum(x.size for x in leaves)}))
"""


def cli_command(python: str) -> list[str]:
    """The ``rwkv-jax`` console script next to ``python`` (else ``python -m rwkv_jax``)."""
    script = os.path.join(os.path.dirname(python), "rwkv-jax")
    return [script] if os.path.exists(script) else [python, "-m", "rwkv_jax"]


def run(cmd: list[str], env: dict, timeout: float) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, proc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fixtures", default=_common.FIXTURES)
    p.add_argument("--fixtures-only", default="", help="comma-separated stems (default all)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--presets", default="rwkv7-0.1b,rwkv4-169m", help="'' to skip builds")
    p.add_argument("--build-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0 = unpinned, library defaults")
    p.add_argument("--no-cache-env", action="store_true")
    p.add_argument("--floor", action="store_true",
                   help="also time _startup_floor.py (no tracing, executables preloaded)")
    p.add_argument("--timeout", type=float, default=900.0, help="per process, seconds")
    p.add_argument("--official-python", default=_common.OFFICIAL_PYTHON)
    p.add_argument("--jax-python", default=sys.executable)
    p.add_argument("--json")
    args = p.parse_args(argv)

    env0 = _common.env_info()
    pin = _common.pin_prefix(args.threads, args.threads > 0)
    jax_env = _common.worker_env("jax", args.threads)
    torch_env = _common.worker_env("torch", args.threads)
    stems = [s for s in args.fixtures_only.split(",") if s]
    paths = sorted(os.path.join(args.fixtures, f) for f in os.listdir(args.fixtures)
                   if f.endswith(".pth") and (not stems or f[:-4] in stems))
    cli = cli_command(args.jax_python)
    times: dict[str, list[float]] = {}
    first: dict[str, list[float]] = {}
    failures: dict[str, str] = {}

    def add(key, value, table=times):
        table.setdefault(key, []).append(value)

    floor_dir = tempfile.mkdtemp(prefix="rwkv_jax_floor_")
    floor_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_startup_floor.py")
    if args.floor:  # the serialized programs, made once (not timed)
        for path in paths:
            run([args.jax_python, floor_py, "prepare", path, PROMPT, str(MAX_TOKENS),
                 os.path.join(floor_dir, os.path.basename(path) + ".pkl")], jax_env,
                args.timeout)
    texts: dict[str, set] = {}

    t_start = time.perf_counter()
    for r in range(args.rounds):
        add("import", run(pin + [args.jax_python, "-c", "import jax, flax"], jax_env,
                          args.timeout)[0])
        for path in paths:
            stem = os.path.basename(path)[:-4]
            if stem in failures:
                continue
            cache = tempfile.mkdtemp(prefix="rwkv_jax_cc_")
            env = dict(jax_env)
            if not args.no_cache_env:
                env.update(JAX_COMPILATION_CACHE_DIR=cache,
                           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                           JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
            cmd = pin + cli + ["generate", "--model", path, "--prompt", PROMPT,
                               "--max-tokens", str(MAX_TOKENS), "--temperature", "0"]
            try:
                for kind in ("cold", "warm"):
                    wall, proc = run(cmd, env, args.timeout)
                    add(f"{stem}:{kind}", wall)
                    texts.setdefault(stem, set()).add(proc.stdout)
                    m = FIRST_TOKEN.search(proc.stderr)
                    if m:
                        add(f"{stem}:{kind}", float(m.group(1)), first)
            except RuntimeError as e:  # e.g. a fixture this checkout cannot load
                failures[stem] = str(e).splitlines()[-1][-120:]
            finally:
                shutil.rmtree(cache, ignore_errors=True)
            if args.floor and stem not in failures:
                wall, proc = run(pin + [args.jax_python, floor_py, "run",
                                        os.path.join(floor_dir, os.path.basename(path) + ".pkl"),
                                        path], jax_env, args.timeout)
                add(f"{stem}:floor", wall)
                texts.setdefault(stem + ":floor", set()).add(proc.stdout)
            wall, _ = run(pin + [args.official_python, "-c", OFFICIAL_SCRIPT, path, PROMPT,
                                 str(MAX_TOKENS), str(args.threads)], torch_env, args.timeout)
            add(f"{stem}:official", wall)
        print(f"round {r + 1}/{args.rounds} done at {time.perf_counter() - t_start:.0f} s",
              file=sys.stderr)

    shutil.rmtree(floor_dir, ignore_errors=True)
    builds: dict[str, list[dict]] = {}
    presets = [x for x in args.presets.split(",") if x]
    for _ in range(args.build_repeats):
        for name in presets:
            _, proc = run(pin + [args.jax_python, "-c", BUILD_SCRIPT, name], jax_env,
                          args.timeout)
            builds.setdefault(name, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))

    med = {k: statistics.median(v) for k, v in times.items()}
    med_first = {k: statistics.median(v) for k, v in first.items()}
    print(f"CLI: {' '.join(cli)}; prompt {PROMPT!r}, {MAX_TOKENS} greedy tokens; median of "
          f"{args.rounds} alternating rounds; "
          f"{'pinned to ' + str(args.threads) + ' core(s)' if args.threads else 'unpinned'}; "
          f"persistent compilation cache "
          f"{'from the environment (JAX_COMPILATION_CACHE_DIR, min compile time 0)' if not args.no_cache_env else 'left to the CLI'}")
    print(_common.format_env(env0))
    imp = med.get("import")
    print(f"\n`python -c \"import jax, flax\"`: {imp:.2f} s\n")
    rows = []
    for path in paths:
        stem = os.path.basename(path)[:-4]
        if stem in failures:
            rows.append([stem, "failed", "-", "-", "-", "-", *(["-", "-"] if args.floor else []),
                         f"{med[stem + ':official']:.2f}",
                         "-", failures[stem]])
            continue
        c, w, o = med[f"{stem}:cold"], med[f"{stem}:warm"], med[f"{stem}:official"]
        fc, fw = med_first.get(f"{stem}:cold"), med_first.get(f"{stem}:warm")
        fl = med.get(f"{stem}:floor")
        note = ""
        if fl is not None and texts.get(stem + ":floor") != texts.get(stem):
            note = "floor text differs from the CLI's"
        rows.append([stem, f"{c:.2f}", f"{w:.2f}", f"{fc:.2f}" if fc else "-",
                     f"{fw:.2f}" if fw else "-", f"{w / imp:.2f}x",
                     *([f"{fl:.2f}", f"{fl / imp:.2f}x"] if args.floor else []), f"{o:.2f}",
                     f"{w / o:.2f}x", note])
    print(_common.markdown_table(
        ["fixture", "rwkv-jax cold s", "warm s", "first token cold s", "first token warm s",
         "warm / import", *(["floor s", "floor / import"] if args.floor else []),
         "official script s", "warm / official", "note"], rows))
    print("\nwarm / import target: <= 1.6x (generate with a filled compilation cache against "
          "importing jax and flax alone)")
    build_rows, build_out = [], {}
    for name, rs in builds.items():
        b = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        build_out[name] = {"median": b, "runs": rs}
        build_rows.append([name, f"{b['params'] / 1e6:.1f}M", f"{b['build_s']:.2f}",
                           f"{b['build_cpu_s']:.2f}", f"{b['param_bytes'] / 2**30:.2f}",
                           f"{b['rss_before'] / 2**30:.2f}", f"{b['peak_rss'] / 2**30:.2f}",
                           f"{(b['peak_rss'] - b['rss_before']) / b['param_bytes']:.2f}"])
    if build_rows:
        print(f"\nPreset build, RWKV(RWKVConfig.preset(name), rngs=nnx.Rngs(0)), fresh process, "
              f"median of {args.build_repeats} (target: <= 5 s for 0.1B):\n")
        print(_common.markdown_table(
            ["preset", "params", "build s", "build CPU s", "param GiB", "RSS before GiB",
             "peak RSS GiB", "(peak - before) / params"], build_rows))
    print(_common.load_line("load average at the end"))
    if args.json:
        _common.write_json(args.json, {"args": vars(args), "env": env0, "times_s": times,
                                       "first_token_s": first, "median_s": med,
                                       "median_first_token_s": med_first,
                                       "failures": failures, "builds": build_out})


if __name__ == "__main__":
    main()
