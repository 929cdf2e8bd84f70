"""GPU check of issue 13 items 3-5 on tiny artifacts built on the spot: sampling inside the CUDA-graph step, the
realized-sparsity counters of the fast path, and the quantized lm_head on CUDA.

    python benchmarks/gpu_generation_check.py --out DIR      # writes DIR/gpu_generation_check.{json,md}

Checks (each a pass / fail line; the exit status is 1 if any fails):
  1. greedy: teal_quant.generate with the CUDA graph equals the eager Decoder, token for token;
  2. sampling: the same seed gives the same tokens with and without the graph (batch 2, temperature / top-k / top-p,
     per-row EOS with padding), and the Sampler draws the same tokens from the same logits on the CPU and CUDA;
  3. counters: off by default in generate (no counter moves), on with track_sparsity=True (realized sparsity near the
     level), and the per-token time of each (graph replay, tiny model: launch-bound, so only indicative);
  4. quantized lm_head (int8, int4): CUDA logits against the CPU's of the same artifact (float32), greedy generation in
     the graph.
Runs on the CPU too (no graph: checks 1-2 compare eager with eager), for a dry run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "calibration" / "tinyshakespeare.txt"


def build(tmp: Path, head: str, device: str) -> Path:
    from teal_quant import Recipe, compress, testing

    model_dir = tmp / "tiny"
    if not model_dir.exists():
        testing.write_tiny_llama(model_dir, TEXT.read_text()[:200_000], tie_word_embeddings=True)
    out = tmp / f"art-{head}"
    text = testing.tiny_recipe_text(model_dir, out, TEXT, quantization=f"quantization: {{bits: 4, group_size: 32, "
                                    f"lm_head: {head}}}") + f"runtime: {{device: {device}}}\n"
    return compress(Recipe.from_yaml_text(text)).artifact


def per_token_ms(fn, tokens: int, cuda: bool) -> float:
    fn()  # warm (capture)
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1000 / tokens


def main(argv: list[str] | None = None) -> int:
    import teal_quant
    from teal_quant.runtime.decoding import Decoder
    from teal_quant.runtime.generation import Sampler, SamplingConfig
    from teal_quant.runtime.modules import reset_stats, teal_linears

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checks": []}

    def check(name: str, ok: bool, **info) -> None:
        results["checks"].append({"check": name, "ok": bool(ok), **info})
        print(("PASS " if ok else "FAIL ") + name + " " + json.dumps(info), flush=True)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        arts = {head: build(tmp, head, device) for head in ("dense", "int8", "int4")}
        model = teal_quant.load(arts["dense"], sparsity=0.4, device=device, dtype=torch.float32)
        prompt = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 2], [1, 77, 8, 300, 64, 21, 99, 13]], device=device)
        n = 24

        # 1. greedy: graph == eager
        fast = teal_quant.generate(model, prompt, n)
        eager = Decoder(model, batch_size=2, max_length=8 + n, cuda_graph=False).generate(prompt, n)
        check("greedy: graph == eager", torch.equal(fast, eager), tokens=fast[:, 8:].tolist())

        # 2. sampling: graph == eager for one seed; per-row EOS pads; CPU and CUDA draw alike
        kw = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=7)
        free = teal_quant.generate(model, prompt, n, **kw)
        eos = int(free[0, 8 + 4])
        s_graph = teal_quant.generate(model, prompt, n, eos_token_id=eos, pad_token_id=0, **kw)
        s_eager = teal_quant.generate(model, prompt, n, eos_token_id=eos, pad_token_id=0, cuda_graph=False, **kw)
        first = int((free[0, 8:] == eos).nonzero()[0])
        padded = bool((s_graph[0, 8 + first + 1:] == 0).all())
        check("sampling: graph == eager (same seed)", torch.equal(s_graph, s_eager), tokens=s_graph[:, 8:].tolist())
        check("sampling: row 0 equals the free run up to its EOS, then pads",
              padded and torch.equal(s_graph[0, : 9 + first], free[0, : 9 + first]), eos=eos, first=first)
        logits = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 3
        sampler = Sampler(SamplingConfig(0.8, 50, 0.9, seed=3))
        agree = [int(sampler(logits, torch.tensor([pos])).eq(sampler(logits.to(device), torch.tensor([pos], device=device)).cpu()).sum())
                 for pos in range(32)]
        check("sampler: CPU and CUDA draw the same tokens from the same logits", sum(agree) == 64 * 32,
              agree=sum(agree), of=64 * 32)

        # 3. counters
        linears = [m for _, m in teal_linears(model)]
        reset_stats(model)
        teal_quant.generate(model, prompt, n)
        untouched = all(float(m.input_count) == 0 for m in linears)
        teal_quant.generate(model, prompt, n, track_sparsity=True)
        realized = teal_quant.realized_sparsity(model, cumulative=True)
        check("counters: off by default in generate, on when asked", untouched and 0.25 < realized < 0.55,
              realized=round(realized, 4))
        timing = {}
        for name, extra in (("greedy", {}), ("greedy, counters on", {"track_sparsity": True}), ("sampling", kw)):
            dec_kw = dict(extra)
            timing[name] = per_token_ms(lambda: teal_quant.generate(model, prompt[:1], 64, **dec_kw), 64, cuda)
        results["per_token_ms_tiny_batch1"] = timing
        print("per-token ms (tiny, batch 1, includes prefill and graph capture amortised):", timing, flush=True)

        # 4. quantized head
        for head in ("int8", "int4"):
            gpu = teal_quant.load(arts[head], sparsity=0.4, device=device, dtype=torch.float32)
            cpu = teal_quant.load(arts[head], sparsity=0.4, device="cpu", dtype=torch.float32)
            with torch.no_grad():
                lg, lc = gpu(prompt).logits.cpu(), cpu(prompt.cpu()).logits
                step_g = gpu.lm_head(torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(1)).to(device))
                step_c = cpu.lm_head(torch.randn(2, 1, 64, generator=torch.Generator().manual_seed(1)))
            rel = float((lg - lc).norm() / lc.norm())
            rel_step = float((step_g.cpu() - step_c).norm() / step_c.norm())
            out = teal_quant.generate(gpu, prompt, 8)
            check(f"lm_head {head}: CUDA logits == CPU logits (float32), decode GEMV too",
                  rel < 1e-4 and rel_step < 1e-4 and out.shape == (2, 16), rel_prefill=rel, rel_decode_gemv=rel_step)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_generation_check.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# gpu_generation_check on {results['device']} ({results['date']}, torch {results['torch']})", "",
             "| check | result | details |", "|---|---|---|"]
    for c in results["checks"]:
        details = {k: v for k, v in c.items() if k not in ("check", "ok", "tokens")}
        lines.append(f"| {c['check']} | {'pass' if c['ok'] else 'FAIL'} | {json.dumps(details)} |")
    lines += ["", "per-token ms, tiny model, batch 1, 64 tokens incl. prefill: "
              + ", ".join(f"{k} {v:.3f}" for k, v in results["per_token_ms_tiny_batch1"].items())]
    (args.out / "gpu_generation_check.md").write_text("\n".join(lines) + "\n")
    return 0 if all(c["ok"] for c in results["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
