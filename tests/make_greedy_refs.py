"""Greedy-generation references from the official ``rwkv`` package for the tiny fixtures.

Usage (needs torch and ``rwkv``; the project itself does not)::

    /work/torchvenv/bin/python tests/make_greedy_refs.py [FIXTURE_DIR] [OUT.json]

For each fixture model: strategy "cpu fp32", ``RWKV_JIT_ON=0``; the byte prompt is run in
sequence mode, then 64 tokens are generated greedily (argmax of the logits, the token fed back
with the state). One model per subprocess (the package reads ``RWKV_V7_ON`` at import). The
two v5 models were trained with GroupNorm eps 1e-5, so ``group_norm`` is patched as the
fixtures' ``tools/make_refs.py`` does. Stores the token lists and, per step, the margin
between the largest and second-largest logit (a small margin = a near-tie that fp32
differences could flip).
"""
import json
import os
import subprocess
import sys

os.environ["RWKV_JIT_ON"] = "0"
os.environ["RWKV_CUDA_ON"] = "0"

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FIXTURES = os.path.join(HERE, "..", "..", "shared", "fixtures", "tiny-rwkv")
# GREEDY_PROMPT overrides the prompt (to compare margins); the default has the largest
# smallest top-2 margin over the five models of the prompts tried: 0.0128 (v6), against
# "First Citizen:\\n" 0.0002, "The " 0.0032, "In the beginning" 0.0001
PROMPT = os.environ.get("GREEDY_PROMPT", "Hello, world").encode()
N_TOKENS = 64
MODELS = {  # file stem -> group-norm eps the model was trained with (None: not v5)
    "rwkv4-tiny-660k": None, "rwkv5.1-tiny-730k": 1e-5, "rwkv5.2-tiny-730k": 1e-5,
    "rwkv6-tiny-3m": None, "rwkv7-tiny-834k": None,
}


def one(fdir: str, stem: str) -> dict:
    path = os.path.join(fdir, stem + ".pth")
    if "rwkv7" in stem:
        os.environ["RWKV_V7_ON"] = "1"
    import rwkv
    import rwkv.model as rm
    import torch
    import torch.nn.functional as F
    if MODELS[stem] == 1e-5:
        orig = F.group_norm

        def gn(x, num_groups, weight=None, bias=None, eps=1e-5):
            return orig(x, num_groups, weight, bias, eps=1e-5)
        rm.F.group_norm = gn
    kw = {} if "rwkv7" in stem else {"verbose": False}
    model = rm.RWKV(model=path[:-4], strategy="cpu fp32", **kw)
    with torch.no_grad():
        out, state = model.forward(list(PROMPT), None)
        tokens, margins = [], []
        for _ in range(N_TOKENS):
            top2 = torch.topk(out.float(), 2).values
            margins.append(float(top2[0] - top2[1]))
            tok = int(torch.argmax(out).item())
            tokens.append(tok)
            out, state = model.forward([tok], state)
    return {"tokens": tokens, "margins": margins, "min_margin": min(margins),
            "rwkv_version": getattr(rwkv, "__version__", None) or _pkg_version("rwkv"),
            "torch_version": torch.__version__}


def _pkg_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "--one":  # child: one model, JSON on stdout
        print(json.dumps(one(args[1], args[2])))
        return
    fdir = os.path.abspath(args[0] if args else DEFAULT_FIXTURES)
    out = args[1] if len(args) > 1 else os.path.join(HERE, "fixtures_greedy.json")
    models = {}
    for stem in MODELS:
        res = subprocess.run([sys.executable, __file__, "--one", fdir, stem], check=True,
                             capture_output=True, text=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        models[stem] = {"tokens": r["tokens"], "margins": [round(m, 6) for m in r["margins"]],
                        "min_margin": round(r["min_margin"], 6),
                        "text": bytes(r["tokens"]).decode("utf-8", "replace")}
        meta = {"rwkv": r["rwkv_version"], "torch": r["torch_version"]}
        print(f"{stem:20s} min margin {r['min_margin']:.4f}  "
              f"{bytes(r['tokens'])[:40]!r}", file=sys.stderr)
    doc = {"prompt": list(PROMPT), "prompt_text": PROMPT.decode(), "n_tokens": N_TOKENS,
           "strategy": "cpu fp32", "RWKV_JIT_ON": "0", "packages": meta,
           "ln_x_eps": {"rwkv5.1-tiny-730k": 1e-5, "rwkv5.2-tiny-730k": 1e-5},
           "models": models}
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
