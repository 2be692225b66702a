"""Memory per device under FSDP: the RWKV-4 169M shape on forced CPU host devices.

For each ``--fsdp`` value, one fresh process with ``--devices`` forced host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count``) builds the real training set-up
(:class:`rwkv_jax.train.trainer.Trainer` with ``model.preset=rwkv4-169m``,
``mesh.fsdp=<k>``, ``mesh.data=-1`` filling the rest) and reports, from the arrays' own
shards:

* parameter and optimizer-state bytes on the fullest device, and the unsharded totals;
* XLA's compiled memory analysis of the train step per device (arguments, outputs,
  temporaries: what the step needs on top of the state), where the backend provides it;
* the wall time of a step (median of ``--steps`` after one warm-up), a batch of
  ``--batch`` x ``--ctx`` tokens split over the ``data x fsdp`` devices.

Forced host devices share the same CPU cores, so the step time measures the cost of the
sharded program (gathers, reduce-scatters, resharding), not a speed-up; on the shared
2-core machine it is noisy, and the load average is recorded. ::

    python benchmarks/bench_fsdp.py                       # fsdp 1, 2, 4, 8 on 8 devices
    python benchmarks/bench_fsdp.py --fsdp 1,8 --steps 3 --json out/fsdp.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

MIB = 2 ** 20


def worker(args) -> dict:
    """One mesh: build the trainer, measure bytes and memory analysis, time steps."""
    import jax

    from rwkv_jax.train.config import load_config
    from rwkv_jax.train.trainer import Trainer

    out = tempfile.mkdtemp(prefix="bench-fsdp-")
    cfg = load_config(None, [
        f"out_dir={out}", f"model.preset={args.preset}", f"mesh.fsdp={args.fsdp_one}",
        "mesh.data=-1", f"train.batch_size={args.batch}", f"data.ctx_len={args.ctx}",
        "data.max_bytes=2000000", f"data.cache_dir={out}/cache", "logging.progress=false"])
    t0 = time.perf_counter()
    t = Trainer(cfg)
    setup_s = time.perf_counter() - t0

    def per_device(tree) -> dict[int, int]:
        per: dict[int, int] = {}
        for x in jax.tree.leaves(tree):
            for s in x.addressable_shards:
                per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
        return per

    def total(tree) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(tree))

    rec = {"mesh": dict(t.topology.mesh.shape), "n_params": t.n_params, "setup_s": setup_s,
           "param_bytes_max": max(per_device(t.state.params).values()),
           "param_bytes_total": total(t.state.params),
           "opt_bytes_max": max(per_device(t.state.opt_state).values()),
           "opt_bytes_total": total(t.state.opt_state), "notes": t.sharding_notes}
    batch = t.global_batch(0)
    t0 = time.perf_counter()
    compiled = t.train_step.lower(t.state, batch).compile()
    rec["compile_s"] = time.perf_counter() - t0
    try:
        mem = compiled.memory_analysis()
        rec["xla_memory"] = {k: int(getattr(mem, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes") if hasattr(mem, k)}
    except Exception as e:  # not every backend/version reports it
        rec["xla_memory"] = {"error": str(e)}
    state = t.state
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    runs = []
    for i in range(args.steps):
        b = t.global_batch(i + 1)

        def step(b=b):
            nonlocal state
            state, m = compiled(state, b)
            jax.block_until_ready((state, m))
        runs.append(_common.timed(step))
    rec["step"] = _common.summarize(runs)
    rec["loss"] = float(m["loss"])
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fsdp", default="1,2,4,8", help="mesh.fsdp values, comma-separated")
    ap.add_argument("--devices", type=int, default=8, help="forced host devices")
    ap.add_argument("--preset", default="rwkv4-169m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp-one", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    env_start = _common.env_info(("jax", "jaxlib", "flax", "optax", "orbax-checkpoint"))
    results = []
    for k in (int(x) for x in args.fsdp.split(",")):
        env = {**os.environ,
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}"}
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--fsdp-one={k}",
               f"--preset={args.preset}", f"--batch={args.batch}", f"--ctx={args.ctx}",
               f"--steps={args.steps}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"fsdp={k}: worker failed\n{proc.stderr[-3000:]}")
        rec = json.loads(next(x for x in proc.stdout.splitlines()
                              if x.startswith("RESULT "))[len("RESULT "):])
        rec["fsdp"] = k
        rec["load_avg_after"] = os.getloadavg()
        results.append(rec)
        print(f"fsdp={k} done: step {rec['step']['median_s']:.2f} s, load "
              f"{rec['load_avg_after'][0]:.1f}", file=sys.stderr, flush=True)

    print(_common.format_env(env_start))
    print(f"{args.preset}, {args.devices} forced host devices, batch {args.batch} x ctx "
          f"{args.ctx}, mesh.data=-1; bytes of the fullest device, from the arrays' shards")
    rows = []
    for r in results:
        mesh = r["mesh"]
        xm = r.get("xla_memory", {})
        temp = xm.get("temp_size_in_bytes")
        rows.append([
            r["fsdp"], f"{mesh['data']}x{mesh['fsdp']}",
            f"{r['param_bytes_max'] / MIB:.1f}", f"{r['opt_bytes_max'] / MIB:.1f}",
            f"{(r['param_bytes_max'] + r['opt_bytes_max']) / MIB:.1f}",
            f"{r['param_bytes_total'] / r['param_bytes_max']:.2f}",
            "-" if temp is None else f"{temp / MIB:.1f}",
            f"{r['step']['median_s']:.2f}", f"{r['compile_s']:.0f}",
            f"{r['load_avg_after'][0]:.1f}"])
    print(_common.markdown_table(
        ["fsdp", "data x fsdp", "params MiB/dev", "opt MiB/dev", "state MiB/dev",
         "total/param per dev", "XLA temp MiB/dev", "step s", "compile s", "load after"],
        rows))
    if results:
        r = results[0]
        print(f"totals: {r['param_bytes_total'] / MIB:.1f} MiB parameters, "
              f"{r['opt_bytes_total'] / MIB:.1f} MiB optimizer state ({r['n_params']:,} "
              f"parameters)")
    for r in results:
        for note in r["notes"]:
            print(f"fsdp={r['fsdp']}: {note}")
    if args.json:
        _common.write_json(args.json, {"env": env_start, "args": vars(args),
                                       "results": results})


if __name__ == "__main__":
    main()
