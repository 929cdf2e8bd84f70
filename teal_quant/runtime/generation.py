"""`teal_quant.generate`: greedy or sampled generation over the Decoder's static cache (a CUDA graph on CUDA).

Sampling runs inside the captured decode step, on the device, with no host sync per token: the Decoder takes a
`next_token(logits, position)` function (teal_quant/runtime/decoding.py) and this module supplies one, `Sampler`:
  1. logits -> float32 scores / temperature, then top-k, then top-p: transformers' TemperatureLogitsWarper,
     TopKLogitsWarper and TopPLogitsWarper, in that order and with their rules (top-k keeps ties with the k-th score;
     top-p removes the tokens whose ascending cumulative probability is <= 1 - top_p and always keeps the most
     likely one); with top_k, top-p runs on the k candidates only (no sort over the vocabulary);
  2. one token per row by the Gumbel-max trick: argmax(scores + Gumbel noise) samples softmax(scores) exactly.
     The noise is a counter-based hash of (seed, position, row, token id), not a generator's state: the same seed
     gives the same draws on the CPU and CUDA, across graph replays and after a warm-up step is rewound, and the
     graph needs no RNG bookkeeping.
Greedy (`do_sample=False`) is the Decoder's own argmax, bit for bit the tokens of the plain greedy loop.

The host looks at the tokens only for a `streamer` (transformers' TextStreamer protocol: `put(prompt)`, then
`put(tokens)` as they come, `end()`; one sync per `stream_every` tokens) and for the EOS check (every
`eos_check_every` tokens). Rows that emit an EOS id emit `pad_token_id` from then on (per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from teal_quant.errors import TealQuantError

__all__ = ["SamplingConfig", "Sampler", "filter_scores", "generate", "uniform_noise"]

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingConfig:
    """temperature > 0; top_k None or 0: off, else >= 1; top_p None or 1.0: off, else in (0, 1]; seed any int."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise TealQuantError(f"temperature must be a positive number, got {t!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0):
            raise TealQuantError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise TealQuantError(f"top_p must be in (0, 1] (1: off), got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TealQuantError(f"seed must be an integer, got {self.seed!r}")

    @property
    def k(self) -> int | None:
        return self.top_k or None

    @property
    def p(self) -> float | None:
        return None if self.top_p is None or self.top_p >= 1.0 else float(self.top_p)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) on int64 tensors holding values in [0, 2^32). Every product stays below
    2^63: 0x846ca68b is applied as 0x046ca68b plus a shift by 31."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = ((x * 0x046CA68B) + ((x & 1) << 31)) & _M32
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    """_mix32 of a python int (the seed's part, computed once on the host)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def uniform_noise(seed: int, position: Tensor, token_ids: Tensor) -> Tensor:
    """U(0, 1) float32 per (row, token) of token_ids [B, C] (int64), a function of (seed, position, row, token id)
    only: 24 random bits, centred, so never 0 or 1. position: [1] int64 tensor on token_ids' device."""
    base = _mix_int(_mix_int(seed) ^ 0x9E3779B9)
    h = _mix32((position.reshape(1, 1) & _M32) ^ base)  # [1, 1]
    rows = torch.arange(token_ids.shape[0], device=token_ids.device, dtype=torch.int64).unsqueeze(1)
    h = _mix32((h + rows * 0x9E3779B1) & _M32)  # [B, 1]
    h = _mix32(h ^ (token_ids & _M32))  # [B, C]
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _top_p_keep(sorted_ascending: Tensor, top_p: float) -> Tensor:
    """transformers' TopPLogitsWarper on scores sorted ascending: keep where the cumulative probability exceeds
    1 - top_p, and always the last (most likely) one."""
    cumulative = sorted_ascending.softmax(dim=-1).cumsum(dim=-1)
    keep = cumulative > 1 - top_p
    keep[..., -1] = True
    return keep


def filter_scores(logits: Tensor, config: SamplingConfig) -> Tensor:
    """float32 scores [B, V] = logits / temperature with -inf at every token top-k / top-p removes (transformers'
    warpers, in their order). The reference form, over the whole vocabulary; `Sampler` computes the same set."""
    scores = logits.to(torch.float32) / config.temperature
    if config.k is not None:
        k = min(config.k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if config.p is not None:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
        keep_sorted = _top_p_keep(sorted_scores, config.p)
        keep = keep_sorted.scatter(-1, order, keep_sorted)
        scores = scores.masked_fill(~keep, -math.inf)
    return scores


class Sampler:
    """next_token(logits [B, V], position [1]) -> [B] int64, device ops only (CUDA-graph safe, no host sync)."""

    def __init__(self, config: SamplingConfig):
        self.config = config

    def candidates(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        """(scores [B, C] with -inf where removed, their token ids [B, C], or None when C is the whole vocabulary)."""
        cfg = self.config
        scores = logits.to(torch.float32) / cfg.temperature
        if cfg.k is None:
            return filter_scores(logits, cfg), None
        k = min(cfg.k, scores.shape[-1])
        values, ids = torch.topk(scores, k, dim=-1)  # descending
        # ties with the k-th score that topk left out are kept by transformers: they cannot be drawn here, a
        # measure-zero event for real logits (documented in docs/decoding.md)
        if cfg.p is not None:
            keep = _top_p_keep(values.flip(-1), cfg.p).flip(-1)
            values = values.masked_fill(~keep, -math.inf)
        return values, ids

    def __call__(self, logits: Tensor, position: Tensor) -> Tensor:
        scores, ids = self.candidates(logits)
        if ids is None:
            ids = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.int64).expand_as(scores)
        u = uniform_noise(self.config.seed, position, ids)
        choice = (scores - torch.log(-torch.log(u))).argmax(dim=-1, keepdim=True)
        return ids.gather(-1, choice).squeeze(-1)


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None, seed: int = 0,
             streamer=None, cuda_graph: bool | None = None, track_sparsity: bool | None = None,
             eos_check_every: int = 8, stream_every: int = 1) -> Tensor:
    """Prompt [B, P] (or [P]) -> [B, P + n] tokens, n <= max_new_tokens: greedy, or sampled with temperature / top_k
    / top_p from `seed` (do_sample=True), inside the CUDA-graph step on CUDA. Rows share the prompt length; a row
    that emits an EOS id pads with pad_token_id (default: the first EOS id); generation stops when every row has
    (checked every eos_check_every tokens). streamer: an object with put(tokens) / end() (transformers'
    TextStreamer; batch 1), given the prompt, then new tokens every stream_every tokens. track_sparsity: count
    realized sparsity during decoding (default: the model's `teal_quant.track_sparsity` choice, else off)."""
    from teal_quant.runtime.decoding import Decoder

    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise TealQuantError(f"input_ids must be [batch, prompt length] with at least one token, got "
                             f"{tuple(input_ids.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise TealQuantError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if streamer is not None and input_ids.shape[0] != 1:
        raise TealQuantError(f"a streamer takes one sequence; got a batch of {input_ids.shape[0]}")
    if stream_every < 1 or eos_check_every < 1:
        raise TealQuantError("stream_every and eos_check_every must be >= 1")
    sampler = Sampler(SamplingConfig(temperature, top_k, top_p, seed)) if do_sample else None
    decoder = Decoder(model, batch_size=input_ids.shape[0], max_length=input_ids.shape[1] + max_new_tokens,
                      cuda_graph=cuda_graph, eos_check_every=eos_check_every, next_token=sampler,
                      track_sparsity=track_sparsity)
    if streamer is None:
        return decoder.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return _streamed(decoder, input_ids, max_new_tokens, eos_token_id, pad_token_id, streamer, stream_every)


def _streamed(decoder, input_ids: Tensor, max_new_tokens: int, eos_token_id, pad_token_id, streamer,
              stream_every: int) -> Tensor:
    """The Decoder's loop with the tokens handed to `streamer` every `stream_every` tokens (one sync each time);
    it stops after the chunk in which the (single) row emitted EOS, and streams nothing after the EOS token."""
    eos = set() if eos_token_id is None else {int(eos_token_id)} if isinstance(eos_token_id, int) else \
        {int(t) for t in eos_token_id}
    streamer.put(input_ids.cpu())
    pending = [decoder.prefill(input_ids, eos_token_id=eos_token_id, pad_token_id=pad_token_id)]
    n = 1
    try:
        while True:
            if len(pending) >= stream_every or n >= max_new_tokens:
                chunk = torch.stack(pending, dim=-1)[0].cpu().tolist()  # the sync
                pending = []
                ended = next((i for i, t in enumerate(chunk) if t in eos), None)
                streamer.put(torch.tensor(chunk if ended is None else chunk[: ended + 1]))
                if ended is not None:
                    break
            if n >= max_new_tokens:
                break
            pending.append(decoder.step())
            n += 1
    finally:
        streamer.end()
    return decoder._out[:, : input_ids.shape[1] + n].clone()
