"""Tensor-name maps shared by several versions (version-specific ones live in the version
modules): the Hugging Face prefix layout and flash-linear-attention's top-level names.

A name map turns official keys into an ecosystem's and back, as a
:class:`~rwkv_jax.versions.base.NameMap`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rwkv_jax.versions.base import NameMap


def rename(key: str, table) -> str:
    """``key`` renamed by the first ``(pattern, replacement)`` of ``table`` that matches."""
    for pattern, repl in table:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


# Hugging Face transformers RwkvForCausalLM (RWKV-4) <-> official, per dotted key; the HF
# remote-code RWKV-5/6 models use the same prefixes (their time_mix/maa names are official)
# (reference §2.3: everything but head.weight gains the "rwkv." prefix).
_HF = [
    (r"^emb\.", "rwkv.embeddings."),
    (r"^blocks\.0\.ln0\.", "rwkv.blocks.0.pre_ln."),
    (r"^blocks\.(\d+)\.att\.time_mix_k$", r"rwkv.blocks.\1.attention.time_mix_key"),
    (r"^blocks\.(\d+)\.att\.time_mix_v$", r"rwkv.blocks.\1.attention.time_mix_value"),
    (r"^blocks\.(\d+)\.att\.time_mix_r$", r"rwkv.blocks.\1.attention.time_mix_receptance"),
    (r"^blocks\.(\d+)\.ffn\.time_mix_k$", r"rwkv.blocks.\1.feed_forward.time_mix_key"),
    (r"^blocks\.(\d+)\.ffn\.time_mix_r$", r"rwkv.blocks.\1.feed_forward.time_mix_receptance"),
    (r"^blocks\.(\d+)\.att\.", r"rwkv.blocks.\1.attention."),
    (r"^blocks\.(\d+)\.ffn\.", r"rwkv.blocks.\1.feed_forward."),
    (r"^blocks\.", "rwkv.blocks."),
    (r"^ln_out\.", "rwkv.ln_out."),
]
_HF_BACK = [
    (r"^rwkv\.embeddings\.", "emb."),
    (r"^rwkv\.blocks\.0\.pre_ln\.", "blocks.0.ln0."),
    (r"^rwkv\.blocks\.(\d+)\.attention\.time_mix_key$", r"blocks.\1.att.time_mix_k"),
    (r"^rwkv\.blocks\.(\d+)\.attention\.time_mix_value$", r"blocks.\1.att.time_mix_v"),
    (r"^rwkv\.blocks\.(\d+)\.attention\.time_mix_receptance$", r"blocks.\1.att.time_mix_r"),
    (r"^rwkv\.blocks\.(\d+)\.feed_forward\.time_mix_key$", r"blocks.\1.ffn.time_mix_k"),
    (r"^rwkv\.blocks\.(\d+)\.feed_forward\.time_mix_receptance$", r"blocks.\1.ffn.time_mix_r"),
    (r"^rwkv\.blocks\.(\d+)\.attention\.", r"blocks.\1.att."),
    (r"^rwkv\.blocks\.(\d+)\.feed_forward\.", r"blocks.\1.ffn."),
    (r"^rwkv\.blocks\.", "blocks."),
    (r"^rwkv\.ln_out\.", "ln_out."),
]


def _table_map(table):
    def apply(tensors: Mapping[str, Any]) -> dict[str, Any]:
        return {rename(k, table): v for k, v in tensors.items()}

    return apply


HF_PREFIXED = NameMap(
    name="hf",
    recognise=lambda keys: any(k.startswith("rwkv.") for k in keys),
    to_official=_table_map(_HF_BACK),
    from_official=_table_map(_HF),
)
"""Hugging Face names of RWKV-4 (transformers ``RwkvForCausalLM``) and of the HF remote-code
RWKV-5/6 World models (the official names under ``rwkv.`` / ``attention`` /
``feed_forward`` / ``embeddings`` / ``pre_ln``, reference §4.2; the RWKV-4 ``time_mix_*``
renames match no v5/v6 key)."""

# flash-linear-attention's names for the tensors outside the blocks (RWKV-6 and RWKV-7)
FLA_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
FLA_TOP_BACK = {v: k for k, v in FLA_TOP.items()}
