"""`teal-quant generate`: text from an artifact, streamed to the terminal as it is decoded, then its speed.

The artifact's own tokenizer encodes the prompt (with `chat`, through its chat template, as the user turn) and
decodes the stream (transformers' TextStreamer: whole words as they complete); generation is
`teal_quant.generate` (the static-cache decoder, a CUDA graph on CUDA, sampling in the step) with the realized
sparsity counted. Stops at the artifact's EOS ids (generation_config.json, else the tokenizer's).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TextIO

import torch

from teal_quant.errors import ArtifactError, TealQuantError, first_line


@dataclass(frozen=True)
class GenerationStats:
    """What one `generate_text` run measured."""

    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    level: float
    realized_sparsity: float | None  # size-weighted over the decode steps; None when nothing was decoded

    @property
    def tokens_per_second(self) -> float | None:
        steps = self.new_tokens - 1  # the first new token comes out of the prefill
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None

    def summary(self) -> str:
        tps = self.tokens_per_second
        speed = f"{tps:.2f} tok/s decode" if tps is not None else "no decode step"
        sparsity = "-" if self.realized_sparsity is None else f"{self.realized_sparsity:.3f}"
        return (f"{self.new_tokens} new tokens, {speed} (prefill of {self.prompt_tokens} tokens "
                f"{self.prefill_seconds:.2f} s); sparsity level {self.level:g}, realized {sparsity}")


class _TimedStreamer:
    """transformers' TextStreamer writing to `out`, recording when the first new tokens arrive (= prefill done)."""

    def __init__(self, tokenizer, out: TextIO):
        from transformers import TextStreamer

        class Streamer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        self._inner = Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.puts = 0
        self.first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt, the second the prefill's token
            self.first_token_at = time.perf_counter()
        self._inner.put(value)

    def end(self) -> None:
        self._inner.end()


def prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """[1, P] token ids of `prompt`; with `chat`, the user turn through the tokenizer's chat template plus the
    assistant's generation prompt."""
    if not prompt.strip():
        raise TealQuantError("--prompt is empty")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise TealQuantError("--chat: this artifact's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise TealQuantError("--prompt encodes to no tokens")
    return ids


def eos_ids(model, tokenizer) -> list[int] | None:
    """The ids generation stops at: generation_config.eos_token_id (an id or a list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return None
    return [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]


def generate_text(artifact: str, prompt: str, *, chat: bool = False, max_new_tokens: int = 128,
                  sparsity: float | None = None, temperature: float = 0.0, top_k: int | None = None,
                  top_p: float | None = None, seed: int = 0, device: str | None = None,
                  out: TextIO) -> GenerationStats:
    """Load `artifact` at `sparsity` (default: its default level), generate from `prompt` (greedy at temperature 0,
    else sampled), stream the text to `out`, and return the measured numbers. Bad input: TealQuantError."""
    from transformers import AutoTokenizer

    from teal_quant.devices import select_device
    from teal_quant.runtime.generation import SamplingConfig, generate
    from teal_quant.runtime.loading import load, resolve_artifact
    from teal_quant.runtime.modules import realized_sparsity, reset_stats

    if isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise TealQuantError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise TealQuantError(f"--temperature must be >= 0 (0: greedy), got {temperature:g}")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise TealQuantError("--top-k / --top-p apply to sampling: give a --temperature > 0 too")
    if temperature > 0:
        SamplingConfig(temperature, top_k, top_p, seed)  # the sampling options' own checks, before loading
    device_ = select_device(device, option="--device")
    path = resolve_artifact(artifact).path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - a missing or broken tokenizer is the artifact's problem, in one line
        raise ArtifactError(f"artifact '{path}': its tokenizer cannot be loaded ({first_line(e)})") from None
    ids = prompt_ids(tokenizer, prompt, chat)
    model = load(path, sparsity=sparsity, device=device_)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and ids.shape[1] + max_new_tokens > limit:
        raise TealQuantError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {max_new_tokens} exceed the model's "
                             f"max_position_embeddings {limit}")
    streamer = _TimedStreamer(tokenizer, out)
    reset_stats(model)
    start = time.perf_counter()
    result = generate(model, ids.to(device_), max_new_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                      top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_ids(model, tokenizer), streamer=streamer,
                      track_sparsity=True)
    if device_.type == "cuda":
        torch.cuda.synchronize(device_)
    end = time.perf_counter()
    first = streamer.first_token_at if streamer.first_token_at is not None else end
    new = result.shape[1] - ids.shape[1]
    return GenerationStats(prompt_tokens=ids.shape[1], new_tokens=new, prefill_seconds=first - start,
                           decode_seconds=end - first, level=float(model.teal_sparsity),
                           realized_sparsity=realized_sparsity(model, cumulative=True) if new > 1 else None)
