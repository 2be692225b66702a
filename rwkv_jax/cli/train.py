"""``rwkv-jax train [--config FILE] [key.sub=value ...]``: train, resume, export, sample.

Every config value is checked (:func:`rwkv_jax.train.config.load_config`) before data is
opened or a model is built. Exit status 3: training diverged (the last checkpoint is intact).
"""

from __future__ import annotations

import argparse
import sys

HELP = ("train a model from a YAML config (default: a small byte-level RWKV-4 on the Python "
        "standard library's sources)")
INTERRUPTED = "interrupted; rerun the same command to resume from the last checkpoint"
DIVERGED = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (default: built-in defaults, which train "
                                    "on the Python standard library's sources)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.max_steps=100 out_dir=runs/x")


def check_mesh(cfg) -> None:
    """The mesh against the devices JAX sees (after joining the other processes), before
    any data is read: the trainer's own mesh builder, so the rules are the same."""
    from rwkv_jax.train.mesh import build_topology
    build_topology(cfg.mesh.data, cfg.mesh.fsdp, cfg.train.batch_size)


def run(args: argparse.Namespace) -> int:
    from rwkv_jax.train.config import load_config
    from rwkv_jax.train.distributed import initialize_from_env
    cfg = load_config(args.config, args.overrides)  # every config error surfaces before work
    # several hosts (RWKV_JAX_COORDINATOR/..._NUM_PROCESSES/..._PROCESS_ID): join them before
    # anything touches a JAX backend
    initialize_from_env()
    check_mesh(cfg)
    from rwkv_jax.train.trainer import Trainer, TrainingDiverged
    trainer = Trainer(cfg)
    try:
        metrics = trainer.fit()
    except TrainingDiverged as e:
        if trainer.primary:
            print(f"rwkv-jax train: {e}", file=sys.stderr)
        return DIVERGED
    if not trainer.primary:  # process 0 reports and samples; the others are done
        return 0
    print(f"step {trainer.step}: val_loss {metrics['val_loss']:.4f} nats/token, "
          f"val_bpb {metrics['val_bpb']:.4f}; model saved to {trainer.out}/model.safetensors")
    t = cfg.train
    if t.sample_tokens > 0:
        from rwkv_jax.generate import generate
        prompt = t.sample_prompt if t.sample_prompt is not None \
            else trainer.batches.sample_prompt()
        text = generate(trainer.host_model(), trainer.batches.tokenizer, prompt,
                        max_tokens=t.sample_tokens, temperature=0.8, top_p=0.9, seed=t.seed)
        print(f"--- sample (prompt {prompt!r}) ---\n{prompt}{text}")
    return 0
