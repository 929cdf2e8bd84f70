"""Round 17 device call 1: which difference between one GEMV call and the decode step reorders launch shapes.

    GIT_COMMIT=... PYTHONPATH=. python benchmarks/profile/round17_call1.py OUT

Round 16 (docs/kernels.md): in the 70B w4 s40 step, o_proj with v2 dense85 shfl decodes 2.86 % faster than with
round 14's v4 pipe (~3.3 µs per call), and qkv with round 15's v2 pipe shfl 2.7 % slower than with v4 dense85 shfl,
while benchmarks/gemv.py (one plain call, N(0, 1) rows, PDL off) put each pair within ~1 µs the other way round.
Here the factors are added one at a time, µs per call in a CUDA graph over weight copies (gemv.py's method), level
0.4 (s40), batch 1:

  plain  gemv.py's call: bf16 y with the split-K tail, PDL off, N(0, 1) x, threshold at its 40 % quantile
  out    the step's form: fp32 ``out=`` and ``clear=`` (two buffers in turn), no tail; qkv as three parts
  pdl    out, with the table's PDL modes
  norm   pdl, each call after an RMSNorm launch that writes its x (the RMSNorm alone subtracted)
  real   norm, on inputs captured from the synthetic 70B's decode step (8 layers in turn, their own thresholds)

Writes OUT/gemv_step_form_h200.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import gemv as bench  # noqa: E402  (sets the `kernels` dispatch's PDL off: this script turns it back on per form)

from kernels import dispatch, gemv_launch  # noqa: E402
from kernels import elementwise_triton as ew  # noqa: E402

GROUP, LEVEL, EPS, CAPTURED_LAYERS = 128, 0.4, 1e-5, (0, 10, 20, 30, 40, 50, 60, 70)
LAYERS = {  # (N, K, parts): the 70B o_proj and the fused q/k/v call
    "o_proj": (8192, 8192, (8192,)),
    "qkv": (10240, 8192, (8192, 1024, 1024)),
}
SHAPES = {  # the pairs round 16 found ordered differently in the step and in gemv.py
    "o_proj": {"v4 pipe (round 14)": {"kernel": "core", "vec": 4, "warps": 4, "rows": 4, "k_range": 128, "pipe": True,
                                      "evict_first": True, "h2": True},
               "v2 dense85 shfl (round 16)": {"kernel": "core", "vec": 2, "warps": 4, "rows": 4, "k_range": 128,
                                              "evict_first": True, "dense": 85, "h2": True, "shfl": True}},
    "qkv": {"v4 dense85 shfl (table)": {"kernel": "core", "vec": 4, "warps": 4, "rows": 4, "k_range": 128,
                                        "evict_first": True, "dense": 85, "h2": True, "shfl": True},
            "v2 pipe shfl (round 15)": {"kernel": "core", "vec": 2, "warps": 4, "rows": 4, "k_range": 128, "pipe": True,
                                        "evict_first": True, "h2": True, "shfl": True}},
}
FORMS = ("plain", "out", "pdl", "norm", "real")


def captured_inputs(arch="llama3-70b", device="cuda", layers=CAPTURED_LAYERS) -> dict[str, list]:
    """(x [1, K] bf16, thresholds [parts]) of the o_proj and q/k/v calls of ``layers`` in one decode step of the
    synthetic model at LEVEL (forward pre-hooks: the step then takes the modules' path, with the same inputs)."""
    from teal_quant.bench import build_synthetic_model
    from teal_quant.compression.synthetic import SyntheticSpec
    from teal_quant.runtime.decoding import Decoder
    from teal_quant.runtime.modules import track_sparsity

    spec = SyntheticSpec(levels=(0.25, 0.4, 0.5), default=LEVEL)
    model = build_synthetic_model(arch, spec, device=device, sparsity=LEVEL)
    track_sparsity(model, False)
    dec = Decoder(model, batch_size=1, max_length=160, cuda_graph=False, fused_step=True)
    prompt = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    tok = dec.prefill(prompt.to(device))
    got: dict = {"o_proj": [], "qkv": []}

    def hook(kind, modules):
        def pre(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if x.shape[0] == 1:  # a decode step's call (the prefill has passed)
                t = torch.stack([m.threshold.reshape(()) for m in modules]).float()
                got[kind].append((x.detach().to(torch.bfloat16).clone(), t.clone()))
        return pre

    handles = []
    for i in layers:
        attn = model.model.layers[i].self_attn
        handles.append(attn.o_proj.register_forward_pre_hook(hook("o_proj", [attn.o_proj])))
        handles.append(attn.q_proj.register_forward_pre_hook(hook("qkv", [attn.q_proj, attn.k_proj, attn.v_proj])))
    dec.step(tok)
    for h in handles:
        h.remove()
    del dec, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return got


def call_fns(kind: str, shape, copies, xs, form: str) -> list:
    """One closure per call on the next weight copy: the GEMV of ``form`` on x = h (plain, out, pdl), or on the output
    of an RMSNorm launch of h (norm, real: the GEMV reads what the kernel before it wrote, as in the step)."""
    n, k, parts = LAYERS[kind]
    bufs = [torch.zeros(1, n, device=xs[0][0].device, dtype=torch.float32) for _ in range(2)]
    fns = []
    for i, c in enumerate(copies):
        h, w, t = xs[i % len(xs)]
        out, clear = (bufs[i % 2], bufs[(i + 1) % 2]) if form != "plain" else (None, None)

        def gemv(x, c=c, t=t, out=out, clear=clear):
            if len(parts) == 1:
                return gemv_launch.sparse_gemv(x, *c, t[0], bits=4, group_size=GROUP, shape=shape, out=out, clear=clear)
            return gemv_launch.sparse_gemv_fused(x, *c, t, list(parts), bits=4, group_size=GROUP, shape=shape, out=out,
                                                 clear=clear)

        if form in ("norm", "real"):
            fns.append(lambda h=h, w=w, gemv=gemv: gemv(ew.rms_norm(h, w, EPS)))
        else:
            fns.append(lambda h=h, gemv=gemv: gemv(h))
    return fns


def main() -> int:
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    real = captured_inputs()
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": os.environ.get("GIT_COMMIT"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "level": LEVEL,
              "captured_layers": list(CAPTURED_LAYERS), "rows": []}
    for kind, (n, k, parts) in LAYERS.items():
        q, qweight, scales, zeros = bench.make_layer(n, k)
        del q
        w_bytes = k * n // 2 + 2 * (k // GROUP) * n * 2
        copies = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone())
                                               for _ in range(bench.n_copies(w_bytes) - 1)]
        g = bench.activations(1, k, 1)
        t40 = torch.full((len(parts),), bench.threshold_for(g, 40), device="cuda")
        ones = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        synthetic = [(g, ones, t40)]
        # real: h = x, weight = rms(x) (so rms_norm(h) * weight gives x back to bf16 rounding), its own thresholds
        captured = [(x, torch.full((k,), float(x.float().pow(2).mean().sqrt()), device="cuda", dtype=torch.bfloat16),
                     t.cuda()) for x, t in real[kind]]
        sparsity = [float((x.float().abs() <= t[0]).float().mean()) for x, _, t in captured]
        for name, shape_dict in SHAPES[kind].items():
            shape = dispatch.shape_from_dict(shape_dict)
            row = {"layer": kind, "shape_name": name, "shape": shape_dict, "real_sparsity": statistics.mean(sparsity)}
            for form in FORMS:
                dispatch.set_programmatic_launch({} if form in ("plain", "out") else None)
                xs = captured if form == "real" else synthetic
                us = bench.time_graph(call_fns(kind, shape, copies, xs, form))
                if form in ("norm", "real"):  # the RMSNorm launches alone, same inputs, same PDL modes
                    norm_only = [lambda h=h, w=w: ew.rms_norm(h, w, EPS) for h, w, _ in xs]
                    row[f"{form}_norm_us"] = bench.time_graph(norm_only)
                    us -= row[f"{form}_norm_us"]
                row[f"{form}_us"] = us
            report["rows"].append(row)
            print(kind, name, {f: round(row[f"{f}_us"], 2) for f in FORMS}, flush=True)
        del copies
        torch.cuda.empty_cache()
    (out_dir / "gemv_step_form_h200.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [f"# One call against the decode step's form, 70B o_proj and qkv ({report['gpu']})", "",
             f"- command: `python benchmarks/profile/round17_call1.py OUT`; date {report['date']}; commit "
             f"{report['commit']}; torch {report['torch']}",
             "- µs per call in a CUDA graph over weight copies; forms added one factor at a time (the script's "
             "docstring); norm / real: the RMSNorm's own time subtracted", "",
             "| layer | launch shape | " + " | ".join(FORMS) + " | real sparsity |",
             "|---|---|" + "---:|" * (len(FORMS) + 1)]
    for row in report["rows"]:
        lines.append(f"| {row['layer']} | {row['shape_name']} | "
                     + " | ".join(f"{row[f'{f}_us']:.2f}" for f in FORMS) + f" | {row['real_sparsity']:.3f} |")
    (out_dir / "gemv_step_form_h200.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
