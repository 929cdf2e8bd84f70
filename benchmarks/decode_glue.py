"""The decode step's glue and attention, side by side on one GPU (issue 13 items 1 and 2): which way is faster.

    python benchmarks/decode_glue.py [--json FILE] [--steps 64] [--compile-layers 2]

On a synthetic Llama-3-8B-shaped teal-quant model (w4 g128, thresholds calibrated on its own activations, level 0.5,
counters off), per-token decode time in the Decoder's CUDA graph (CUDA events over `--steps` steps after a warm-up)
and the eager kernel profile (teal_quant.bench._profile: linear / attention / norm+rotary / other) of:

  transformers   the transformers forward each step (one-launch RMSNorm / SiLU-and-mul / rotary, SDPA over
                 repeat_kv copies of the static cache, cache index_copy_, mask fills): the path before issue 13
  fused          FusedDecodeStep: add+RMSNorm kernels, decode_attention (rotary + cache write + split-KV GQA
                 attention + in-kernel combine: one launch), greedy tail kernels
  fused_combine2 the same with the split combination as a second launch
  fused_sdpa     the fused step with SDPA(enable_gqa=True) over the cache (rotary / cache write in torch ops)
at batch 1, 4 and 16; then, on the model cut to `--compile-layers` layers (torch.compile traces every layer):
  fused               (the same model, for the comparison)
  compiled_glue       the fused step's glue as plain torch ops compiled by torch.compile (inductor), our attention
  compiled_glue_sdpa  the same with SDPA(enable_gqa=True)
Correctness (teacher-forced logits of every variant against `transformers` on the same tokens, rel err; greedy
token agreement over 32 tokens) is printed next to the times. Results go to --json and stdout.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from teal_quant.bench import _profile, _truncate, build_synthetic_model
from teal_quant.compression.synthetic import SyntheticSpec
from teal_quant.runtime.decoding import Decoder
from teal_quant.runtime.modules import track_sparsity

VARIANTS = {
    "transformers": {"fused_step": False},
    "fused": {"fused_step": True},
    "fused_combine2": {"fused_step": True, "fused_step_options": {"fused_reduce": False}},
    "fused_sdpa": {"fused_step": True, "fused_step_options": {"attention": "sdpa"}},
}
COMPILED = {
    "fused": ({"fused_step": True}, False),
    "compiled_glue": ({"fused_step": True, "fused_step_options": {"glue": "torch"}}, True),
    "compiled_glue_sdpa": ({"fused_step": True, "fused_step_options": {"glue": "torch", "attention": "sdpa"}}, True),
}


class Compiled:
    """The fused step's __call__ through torch.compile (captured by the Decoder's CUDA graph like the plain one)."""

    def __init__(self, step):
        self.step = step
        self.fn = torch.compile(step.__call__, dynamic=False)

    def __call__(self, tokens, pos):
        return self.fn(tokens, pos)


def make_decoder(model, batch, length, kw, compiled=False, graph=True):
    dec = Decoder(model, batch_size=batch, max_length=length, cuda_graph=graph, **kw)
    if compiled:
        dec._fused = Compiled(dec._fused)
    return dec


def time_steps(model, prompt, kw, steps, compiled=False) -> dict:
    dec = make_decoder(model, prompt.shape[0], prompt.shape[1] + steps + 24, kw, compiled)
    t0 = time.time()
    tok = dec.prefill(prompt)
    for _ in range(8):
        tok = dec.step(tok)
    torch.cuda.synchronize()
    warm_s = time.time() - t0
    ms = replay_ms(dec, steps)
    if dec._graph is None:
        raise RuntimeError(f"no CUDA graph: {dec.graph_error}")
    return {"ms_per_token": ms, "warmup_s": round(warm_s, 1)}


def replay_ms(dec: Decoder, steps: int) -> float:
    """ms per step of `steps` decode steps of a warmed-up Decoder, by CUDA events around them."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        dec.step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def graph_us(fn_list, reps: int = 40, replays: int = 15) -> float:
    """µs per call: ``reps`` calls (cycling fn_list, e.g. over weight copies that defeat the L2) captured in one CUDA
    graph, median over ``replays`` replays (benchmarks/gemv.py's method)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fn_list:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn_list[i % len(fn_list)]()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000 / reps)
    times.sort()
    del g
    return times[len(times) // 2]


def breakdown(model, prompt, kw, compiled=False) -> dict:
    dec = make_decoder(model, prompt.shape[0], prompt.shape[1] + 16, kw, compiled, graph=False)
    state = {"t": dec.prefill(prompt)}
    for _ in range(4):
        state["t"] = dec.step(state["t"])

    def step():
        state["t"] = dec.step(state["t"])

    b = _profile(step, 3, True)
    keep = ("linear_ms", "attention_ms", "norm_rotary_ms", "other_ms", "launches_per_step", "top_other")
    out = {k: b[k] for k in keep}
    out["nonlinear_ms"] = b["attention_ms"] + b["norm_rotary_ms"] + b["other_ms"]
    return out


@torch.no_grad()
def forced(model, prompt, tokens, kw, compiled=False) -> torch.Tensor:
    dec = make_decoder(model, prompt.shape[0], prompt.shape[1] + tokens.shape[1] + 1, kw, compiled)
    dec.prefill(prompt)
    out = []
    for i in range(tokens.shape[1]):
        dec.step(tokens[:, i])
        out.append(dec.logits.float().clone())
    return torch.stack(out, 1)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def guarded(results, key, fn):
    try:
        results[key] = fn()
    except Exception as e:  # noqa: BLE001 - report and go on with the other variants
        results[key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0], "trace": traceback.format_exc()[-1500:]}
    print(f"[decode_glue] {key}: {json.dumps(results[key])[:600]}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--compile-layers", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16")
    args = ap.parse_args()
    t0 = time.time()
    spec = SyntheticSpec(levels=(0.25, 0.4, 0.5), default=0.5)
    model = build_synthetic_model("llama3-8b", spec, device="cuda", sparsity=0.5)
    track_sparsity(model, False)
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "build_s": round(time.time() - t0, 1)}
    g = torch.Generator().manual_seed(0)
    batches = [int(b) for b in args.batches.split(",")]
    prompt = torch.randint(0, model.config.vocab_size, (max(batches), 128), generator=g).cuda()

    # correctness first: teacher-forced logits on the transformers path's own greedy tokens, batch 4
    ref_dec = make_decoder(model, 4, 128 + 33, {"fused_step": False})
    ref_tokens = ref_dec.generate(prompt[:4], 32)[:, 128:]
    del ref_dec
    ref = forced(model, prompt[:4], ref_tokens, {"fused_step": False})
    for name, kw in VARIANTS.items():
        if name == "transformers":
            continue

        def check(kw=kw):
            got = forced(model, prompt[:4], ref_tokens, kw)
            free = make_decoder(model, 4, 128 + 33, kw).generate(prompt[:4], 32)[:, 128:]
            return {"forced_logits_rel_err": rel(got, ref),
                    "forced_top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
                    "free_running_token_agreement": float((free == ref_tokens).float().mean())}

        guarded(results, f"check_{name}", check)

    for b in batches:
        for name, kw in VARIANTS.items():
            guarded(results, f"time_{name}_b{b}", lambda kw=kw, b=b: time_steps(model, prompt[:b], kw, args.steps))
    for name in ("transformers", "fused", "fused_sdpa"):
        guarded(results, f"profile_{name}_b1", lambda kw=VARIANTS[name]: breakdown(model, prompt[:1], kw))
    guarded(results, "profile_fused_b16", lambda: breakdown(model, prompt[:16], VARIANTS["fused"]))

    # torch.compile of the glue, on a model cut to a few layers (compile time grows with the layers it traces)
    _truncate(model, args.compile_layers)
    small_ref = forced(model, prompt[:4], ref_tokens[:, :8], {"fused_step": False})
    for name, (kw, compiled) in COMPILED.items():
        def run(kw=kw, compiled=compiled):
            t = time.time()
            got = forced(model, prompt[:4], ref_tokens[:, :8], kw, compiled)
            first_s = time.time() - t
            out = {"forced_logits_rel_err": rel(got, small_ref), "first_call_s": round(first_s, 1)}
            out.update(time_steps(model, prompt[:1], kw, args.steps, compiled))
            out["profile"] = breakdown(model, prompt[:1], kw, compiled)
            return out

        guarded(results, f"layers{args.compile_layers}_{name}_b1", run)
    results["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("[decode_glue] summary (ms/token, CUDA graph):", flush=True)
    for k, v in results.items():
        if isinstance(v, dict) and "ms_per_token" in v:
            print(f"  {k}: {v['ms_per_token']:.3f}", flush=True)
        elif isinstance(v, dict) and "nonlinear_ms" in v:
            print(f"  {k}: linear {v['linear_ms']:.3f} attention {v['attention_ms']:.3f} norm+rotary "
                  f"{v['norm_rotary_ms']:.3f} other {v['other_ms']:.3f} nonlinear {v['nonlinear_ms']:.3f} "
                  f"({v['launches_per_step']:.0f} kernels)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
