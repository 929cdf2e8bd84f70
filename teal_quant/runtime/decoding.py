"""Greedy decoding with a static KV cache, the decode step captured once in a CUDA graph (gpt-fast's loop).

`Decoder(model, batch_size=B, max_length=L)` owns a transformers `StaticCache` of L positions and a few static
device buffers (the current tokens, their position, the attention mask, the generated tokens). `prefill` runs the
prompt eagerly; every `step` then replays the captured graph, which runs the model on the static token buffer,
takes the argmax on the device, writes it back into the token buffer and the output row, and advances the
position and the mask: the host does no work per token but `graph.replay()`, and never waits for the device.
EOS: finished rows keep emitting `pad_token_id` (default: the first EOS id; on the device); the host looks whether
every row is finished only every `eos_check_every` tokens. `next_token` replaces the argmax (a function of the
logits [B, V] and the [1] position of the token they follow; teal_quant/runtime/generation.py's sampler), inside the
captured step; the realized-sparsity counters are off in the step unless asked (`track_sparsity`).

On CUDA a Llama-family model's step is `teal_quant.runtime.decode_step.FusedDecodeStep` (residual add + RMSNorm in
one launch, rotary + cache write + GQA attention over the static cache in one launch, no mask, no copies); with
greedy decoding, one EOS id and no separate pad id, the step's tail (argmax, EOS, token / output / position updates)
is `kernels.greedy_advance` (two launches). Other models, and `fused_step=False`, run the transformers forward; other
tails (sampling, several EOS ids) run in torch ops.

Works for any transformers causal LM with a static cache (a dense bf16 model as well as a teal_quant one).
transformers 5.24 takes `cache=` and tracks cache positions inside the cache; 5.17 takes `past_key_values=` and
`cache_position=`: the forward's signature decides which keywords are passed (`_forward_kwargs`).
Rows of one batch share the prompt length (no padding).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from teal_quant import kernels
from teal_quant.runtime.modules import counting, decode_tracking

MAX_EOS_IDS = 8  # EOS ids a generation may stop on (a static buffer, so a captured graph serves any set)


def _forward_parameters(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


class Decoder:
    """Greedy decoder over a static cache; `cuda_graph=None` means on for CUDA, off on the CPU.

    On CUDA the model's q/k/v and gate/up TealLinear groups are fused first (teal_quant/runtime/fusion.py) and its
    Llama-style RMSNorm, SiLU-and-mul and rotary take one-launch kernels (teal_quant/runtime/elementwise.py; dense models
    too). `fuse=False` keeps the eager calls, `fuse_elementwise=False` only the eager elementwise ops (both for
    comparisons). `fused_step=None` runs the fused decode step (teal_quant/runtime/decode_step.py) on CUDA whenever
    the model qualifies (`fused_step_error` says why not), True requires it (on the CPU too: the kernels' references),
    False keeps the transformers forward; `fused_step_options` go to FusedDecodeStep (glue / attention variants for
    benchmarks)."""

    def __init__(self, model: nn.Module, *, batch_size: int, max_length: int, cuda_graph: bool | None = None,
                 eos_check_every: int = 8, fuse: bool = True, fuse_elementwise: bool | None = None,
                 next_token: Callable[[Tensor, Tensor], Tensor] | None = None, track_sparsity: bool | None = None,
                 fused_step: bool | None = None, fused_step_options: dict | None = None):
        from transformers import StaticCache

        if batch_size < 1 or max_length < 2:
            raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
        self.model = model
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.device = next(model.parameters()).device
        if cuda_graph is None:
            cuda_graph = self.device.type == "cuda"
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on CUDA, this one is on {self.device}")
        self.cuda_graph = bool(cuda_graph)
        self.eos_check_every = max(1, int(eos_check_every))
        if self.device.type == "cuda":
            from teal_quant.runtime.fusion import fuse_for_decode

            fuse_for_decode(model, projections=fuse, elementwise=fuse if fuse_elementwise is None else fuse_elementwise)
        params = _forward_parameters(model)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._pass_cache_position = "cache_position" in params
        self._logits_to_keep = "logits_to_keep" in params
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_length)
        b, dev = self.batch_size, self.device
        self._tokens = torch.zeros(b, 1, dtype=torch.long, device=dev)  # input of the next step
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)  # its position (cache_position)
        self._mask = torch.zeros(b, self.max_length, dtype=torch.long, device=dev)
        self._out = torch.zeros(b, self.max_length, dtype=torch.long, device=dev)
        self._finished = torch.zeros(b, dtype=torch.bool, device=dev)
        self._eos = torch.full((MAX_EOS_IDS,), -1, dtype=torch.long, device=dev)  # -1: no id
        self._pad = torch.full((), -1, dtype=torch.long, device=dev)  # what a finished row emits
        self._next_token = next_token  # None: greedy (argmax)
        self.track_sparsity = decode_tracking(model, track_sparsity)  # counters in the decode steps and prefill
        self._graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None  # why capture failed, if it did (then steps run eagerly)
        self.length = 0  # tokens in the cache + the pending one in self._tokens (host-side count, no sync)
        self._logits: Tensor | None = None
        self._fused = None  # the FusedDecodeStep, when the step runs fused
        self.fused_step_error: str | None = None  # why the step is not fused, when fused_step=None found it cannot be
        if fused_step or (fused_step is None and self.device.type == "cuda"):
            from teal_quant.runtime.decode_step import FusedDecodeStep, fused_step_support

            reason = fused_step_support(model)
            if reason is None:
                self._fused = FusedDecodeStep(model, self.cache, batch_size=b, max_length=self.max_length,
                                              **(fused_step_options or {}))
            elif fused_step:
                raise ValueError(f"fused_step=True: {reason}")
            else:
                self.fused_step_error = reason
        # The one-kernel greedy tail: fused step, argmax, at most one EOS id that finished rows repeat (prefill
        # switches to the torch tail, dropping a captured graph, when a generation asks for more)
        self._kernel_tail = self._fused is not None and next_token is None
        self._greedy_workspace: Tensor | None = None

    @property
    def logits(self) -> Tensor | None:
        """Logits [B, V] of the last prefill / step (a buffer the next step overwrites: clone to keep it)."""
        return self._logits

    # -- model calls -------------------------------------------------------------------------------------------
    def _forward(self, input_ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        kwargs = {self._cache_kw: self.cache, "attention_mask": mask, "position_ids": positions.unsqueeze(0)
                  .expand(input_ids.shape[0], -1), "use_cache": True}
        if self._pass_cache_position:
            kwargs["cache_position"] = positions
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with counting(self.track_sparsity):
            out = self.model(input_ids=input_ids, **kwargs)
        return out.logits[:, -1, :]

    def _next(self, logits: Tensor, position: Tensor) -> Tensor:
        nxt = logits.argmax(dim=-1) if self._next_token is None else self._next_token(logits, position)
        return torch.where(self._finished, self._pad, nxt)

    def _is_eos(self, tokens: Tensor) -> Tensor:
        return (tokens.unsqueeze(-1) == self._eos).any(-1)

    def _step_body(self) -> None:
        """One decode step on the static buffers only (what the CUDA graph captures)."""
        pos = self._pos
        if self._fused is not None:
            with counting(self.track_sparsity):
                logits = self._logits = self._fused(self._tokens, pos)
        else:
            self._mask.index_fill_(1, pos, 1)
            logits = self._logits = self._forward(self._tokens, pos, self._mask)
        self._advance(logits)

    def _advance(self, logits: Tensor) -> None:
        """The step's tail: next tokens, EOS, token / output / position buffers (two launches with the kernel tail)."""
        pos = self._pos
        if self._kernel_tail:
            need = kernels.greedy_workspace_size(*logits.shape)
            if self._greedy_workspace is None or self._greedy_workspace.numel() < need:
                self._greedy_workspace = torch.empty(need, dtype=torch.float32, device=logits.device)
            kernels.greedy_advance(logits, self._tokens, self._finished, self._eos[0], self._out, pos,
                                   self._greedy_workspace)
            return
        nxt = self._next(logits, pos)
        self._finished |= self._is_eos(nxt)
        self._tokens.copy_(nxt.unsqueeze(1))
        pos.add_(1)
        self._out.index_copy_(1, pos, nxt.unsqueeze(1))

    # -- public API --------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence (the cache and the buffers keep their addresses: a captured graph stays valid)."""
        self.cache.reset()
        for t in (self._tokens, self._pos, self._mask, self._out, self._finished):
            t.zero_()
        self.length = 0

    @torch.no_grad()
    def prefill(self, input_ids: Tensor, *, eos_token_id: int | list[int] | None = None,
                pad_token_id: int | None = None) -> Tensor:
        """Run the prompt [B, P] eagerly into a fresh cache; returns the next tokens [B] (greedy, or next_token's).
        A row that emits one of `eos_token_id` emits `pad_token_id` (default: the first EOS id) from then on."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ValueError(f"input_ids must be [batch_size={self.batch_size}, P], got {tuple(input_ids.shape)}")
        p = input_ids.shape[1]
        if not 1 <= p < self.max_length:
            raise ValueError(f"prompt of {p} tokens does not leave room in max_length={self.max_length}")
        eos = [] if eos_token_id is None else [int(eos_token_id)] if isinstance(eos_token_id, int) else \
            [int(t) for t in eos_token_id]
        if len(eos) > MAX_EOS_IDS:
            raise ValueError(f"at most {MAX_EOS_IDS} EOS ids, got {len(eos)}")
        pad = pad_token_id if pad_token_id is not None else eos[0] if eos else -1
        if self._kernel_tail and (len(eos) > 1 or (eos and pad != eos[0])):
            self._kernel_tail, self._graph, self.graph_error = False, None, None  # the torch tail: capture again
        self.reset()
        self._eos.fill_(-1)
        self._eos[: len(eos)] = torch.tensor(eos, dtype=torch.long)
        self._pad.fill_(pad)
        ids = input_ids.to(self.device, torch.long)
        self._mask[:, :p] = 1
        self._out[:, :p] = ids
        positions = torch.arange(p, device=self.device)
        logits = self._logits = self._forward(ids, positions, self._mask[:, :p])
        nxt = self._next(logits, positions[-1:])
        self._finished |= self._is_eos(nxt)
        self._tokens.copy_(nxt.unsqueeze(1))
        self._pos.fill_(p)
        self._out[:, p] = nxt
        self.length = p + 1
        return nxt.clone()

    @torch.no_grad()
    def step(self, tokens: Tensor | None = None) -> Tensor:
        """Feed `tokens` [B] (default: the tokens the last call returned); returns the next tokens [B]."""
        if self.length == 0:
            raise ValueError("call prefill before step")
        if self.length >= self.max_length:
            raise ValueError(f"max_length={self.max_length} exceeded: the cache is full")
        if tokens is not None:
            if tokens.shape not in ((self.batch_size,), (self.batch_size, 1)):
                raise ValueError(f"tokens must be [batch_size={self.batch_size}], got {tuple(tokens.shape)}")
            self._tokens.copy_(tokens.reshape(-1, 1))
        self._run_step()
        self.length += 1
        return self._tokens[:, 0].clone()

    def _run_step(self) -> None:
        if not self.cuda_graph:
            self._step_body()
            return
        if self._graph is None and self.graph_error is None:
            self._capture()
        if self._graph is not None:
            self._graph.replay()
            self._logits = self._graph_logits
        else:
            self._step_body()

    def _state(self) -> list[Tensor]:
        return [self._tokens, self._pos, self._finished]

    def _capture(self) -> None:
        """Warm up one step on a side stream (compiles kernels, allocates workspaces outside the capture), put the
        state back to before it, then capture the step. The capture runs nothing, so the replay that follows (in
        _run_step) performs this step for real; the warm-up's cache / mask / output writes are rewritten by it
        with the same values."""
        saved = [t.clone() for t in self._state()]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._step_body()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=stream):
                self._step_body()
        except Exception as e:  # a model whose step cannot be captured still decodes, eagerly
            self.graph_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA graph capture failed, decoding eagerly ({self.graph_error})", stacklevel=3)
            torch.cuda.synchronize(self.device)
            self._restore(saved)
            return
        self._graph = graph
        self._graph_logits = self._logits  # the captured step's output buffer, rewritten by every replay

    def _restore(self, saved: list[Tensor]) -> None:
        for t, s in zip(self._state(), saved):
            t.copy_(s)
        self._set_cache_length(saved[1])

    def _set_cache_length(self, length: Tensor) -> None:
        # transformers 5.24 keeps the cache position in each layer (`cumulative_length`, a device tensor).
        for layer in getattr(self.cache, "layers", []):
            cum = getattr(layer, "cumulative_length", None)
            if isinstance(cum, Tensor):
                cum.copy_(length.reshape(()))

    @property
    def finished(self) -> Tensor:
        """[B] bool on the device: rows that have emitted an EOS id (reading it on the host is a sync)."""
        return self._finished

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None) -> Tensor:
        """Prompt [B, P] + up to max_new_tokens tokens -> [B, P + n]. Rows that emitted an EOS id continue with
        pad_token_id (default: the first EOS id); the loop stops early once every row has (checked every
        eos_check_every tokens)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        p = input_ids.shape[-1]
        if p + max_new_tokens > self.max_length:
            raise ValueError(f"prompt {p} + max_new_tokens {max_new_tokens} exceeds max_length={self.max_length}")
        self.prefill(input_ids, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        n = 1
        while n < max_new_tokens:
            if eos_token_id is not None and n % self.eos_check_every == 0 and bool(self._finished.all()):
                break
            self._run_step()
            self.length += 1
            n += 1
        return self._out[:, : p + n].clone()


@torch.no_grad()
def generate(model: nn.Module, input_ids: Tensor, max_new_tokens: int, *, cuda_graph: bool | None = None,
             eos_token_id: int | None = None) -> Tensor:
    """Greedy generation with a static cache (and a CUDA graph on CUDA): [B, P] -> [B, P + n]."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    decoder = Decoder(model, batch_size=input_ids.shape[0], max_length=input_ids.shape[1] + max_new_tokens,
                      cuda_graph=cuda_graph)
    return decoder.generate(input_ids, max_new_tokens, eos_token_id=eos_token_id)
