"""Calibration and evaluation text sources -> token batches.

Every source yields one long token stream (text files, a dataset column) or whole sampled sequences
(generated); calibration takes seeded random windows of it, evaluation takes its first N tokens.
"""

from __future__ import annotations

import glob
import hashlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from teal_quant.compression.recipe import GeneratedSource, HFDatasetSource, TextFilesSource
from teal_quant.errors import DataError, first_line


def expand_paths(patterns: list[str]) -> list[Path]:
    """Paths and globs -> existing files, in a stable order; a pattern matching nothing is an error."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise DataError(f"text file '{pattern}': no such file")
        files.extend(Path(m) for m in matches)
    return files


def check_text_files(source: TextFilesSource, role: str) -> None:
    """Before any model is opened: every path or glob names a readable file that looks like text (its first 4 KB
    decode as UTF-8 and hold no NUL byte). `role` ("calibration", "eval") names the recipe section in the error."""
    for path in _expand(source.paths, role):
        try:
            with path.open("rb") as f:
                head = f.read(4096)
        except OSError as e:
            raise DataError(f"{role} text file '{path}': cannot read ({e.strerror})") from None
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 4:  # a multi-byte character cut at the 4 KB boundary is fine
                raise DataError(f"{role} text file '{path}': not UTF-8 text (byte {e.start})") from None
        if b"\0" in head:
            raise DataError(f"{role} text file '{path}': binary, not text (NUL byte)")


def _expand(patterns: list[str], role: str) -> list[Path]:
    try:
        return expand_paths(patterns)
    except DataError as e:
        raise DataError(f"{role} {e} (relative paths are relative to the working directory '{Path.cwd()}')") from None


def read_text(source: TextFilesSource | HFDatasetSource) -> str:
    """The whole text of a file or dataset source, documents separated by blank lines."""
    if isinstance(source, TextFilesSource):
        parts = []
        for path in expand_paths(source.paths):
            try:
                parts.append(path.read_text(encoding="utf-8", errors="replace"))
            except OSError as e:
                raise DataError(f"text file '{path}': cannot read ({e.strerror})") from None
        return "\n\n".join(parts)
    return "\n\n".join(t for t in _dataset_column(source) if t and t.strip())


def _dataset_column(source: HFDatasetSource) -> list[str]:
    return [t for batch in _dataset_batches(source) for t in batch]


def _dataset_batches(source: HFDatasetSource, batch_size: int = 1000) -> Iterator[list[str]]:
    """The dataset's text column, a batch of rows at a time (the column is never held whole in memory)."""
    try:
        import datasets
    except ImportError:
        raise DataError("calibration source hf_dataset needs the 'datasets' package: pip install 'teal-quant[datasets]'") from None
    try:
        ds = datasets.load_dataset(source.name, source.config, split=source.split)
    except Exception as e:
        raise DataError(f"dataset '{source.name}': cannot load split '{source.split}' ({first_line(e)})") from None
    if source.column not in ds.column_names:
        raise DataError(f"dataset '{source.name}': no column '{source.column}' (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns([source.column]).iter(batch_size=batch_size):
        yield list(batch[source.column])


# Calibration draws `samples` random windows from a pool of POOL_FACTOR x samples x seq_len tokens: enough that windows
# rarely overlap, without tokenizing a whole corpus (wikitext-103 is ~120M tokens; 128 x 2048 windows need 4M).
POOL_FACTOR = 16
CHUNK_CHARS = 4_000_000  # text is tokenized in pieces of about this many characters, cut at a paragraph break


def iter_text(source: TextFilesSource | HFDatasetSource) -> Iterator[str]:
    """The documents of a file or dataset source, in order (what read_text joins with blank lines), read lazily."""
    if isinstance(source, TextFilesSource):
        for path in expand_paths(source.paths):
            try:
                yield path.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise DataError(f"text file '{path}': cannot read ({e.strerror})") from None
        return
    for batch in _dataset_batches(source):
        for text in batch:
            if text and text.strip():
                yield text


def calibration_stream(tokenizer, source: TextFilesSource | HFDatasetSource, tokens: int) -> torch.Tensor:
    """Token ids of the source's text, tokenized piece by piece until at least `tokens` ids are there (all of it
    when it is shorter). A text under CHUNK_CHARS is tokenized in one call, exactly as tokenize_stream(read_text())."""
    pieces: list[torch.Tensor] = []
    count, buffer, buffered = 0, [], 0

    def flush(text: str) -> int:
        ids = _tokenize_remembered(tokenizer, text)
        pieces.append(ids)
        return ids.numel()

    for doc in iter_text(source):
        buffer.append(doc)
        buffered += len(doc) + 2
        while buffered >= CHUNK_CHARS:
            text = "\n\n".join(buffer)
            cut = text.rfind("\n\n", 0, CHUNK_CHARS)
            cut = cut if cut > 0 else CHUNK_CHARS
            count += flush(text[:cut])
            rest = text[cut:].lstrip("\n")
            buffer, buffered = ([rest], len(rest)) if rest else ([], 0)
            if count >= tokens:
                return torch.cat(pieces)
    if buffer:
        flush("\n\n".join(buffer))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


_LAST_TOKENIZED: dict[tuple[str, str], torch.Tensor] = {}  # one entry: (tokenizer digest, text digest) -> ids


def _tokenize_remembered(tokenizer, text: str) -> torch.Tensor:
    """tokenize_stream, the last result kept per process: compressing the same calibration text with the same
    tokenizer again (a quality report's builds, a notebook's reruns, a test suite) gets the same ids without
    tokenizing it again (1 s for 1.1 MB of text). Keyed by the whole tokenizer (its serialized fast backend and
    init arguments) and the text; a tokenizer without a fast backend is tokenized every time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return tokenize_stream(tokenizer, text)
    described = f"{type(tokenizer).__qualname__}\0{sorted(tokenizer.init_kwargs.items())!r}\0{backend.to_str()}"
    key = (hashlib.sha256(described.encode()).hexdigest(), hashlib.sha256(text.encode()).hexdigest())
    ids = _LAST_TOKENIZED.get(key)
    if ids is None:
        ids = tokenize_stream(tokenizer, text)
        _LAST_TOKENIZED.clear()
        _LAST_TOKENIZED[key] = ids
    return ids


def tokenize_stream(tokenizer, text: str) -> torch.Tensor:
    """Token ids of a long text, without special tokens (windows add their own BOS)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    return tokenizer.bos_token_id


def random_windows(stream: torch.Tensor, samples: int, seq_len: int, seed: int, bos: int | None) -> torch.Tensor:
    """`samples` windows of seq_len tokens at seeded random offsets (BOS first when the model has one)."""
    body = seq_len - (1 if bos is not None else 0)
    if stream.numel() < body + 1:
        raise DataError(f"calibration text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - body, (samples,), generator=gen)
    windows = torch.stack([stream[s : s + body] for s in starts.tolist()])
    if bos is not None:
        windows = torch.cat([torch.full((samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


@torch.no_grad()
def generate_samples(
    model,
    tokenizer,
    source: GeneratedSource,
    samples: int,
    seq_len: int,
    seed: int,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Sequences sampled from the model itself (seeded): calibration data without any dataset."""
    prompt = tokenizer(source.prompt, add_special_tokens=False)["input_ids"] if source.prompt else []
    bos = bos_id(tokenizer)
    prefix = ([bos] if bos is not None else []) + prompt
    if not prefix:
        raise DataError("generated calibration needs a prompt for a model without a BOS token")
    if len(prefix) >= seq_len:
        raise DataError(f"generated calibration prompt is {len(prefix)} tokens, not shorter than seq_len {seq_len}")
    torch.manual_seed(seed)
    out = []
    for start in range(0, samples, batch_size):
        n = min(batch_size, samples - start)
        ids = torch.tensor([prefix] * n, device=device)
        seqs = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=source.temperature,
            top_k=source.top_k or None,
            max_new_tokens=seq_len - len(prefix),
            min_new_tokens=seq_len - len(prefix),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        )
        out.append(seqs[:, :seq_len].cpu())
        if progress:
            progress(n)
    return torch.cat(out)


def evaluation_windows(tokenizer, text: str, tokens: int, window: int) -> torch.Tensor:
    """The first `tokens` tokens of the text cut into non-overlapping windows of `window` (BOS first)."""
    bos = bos_id(tokenizer)
    body = window - (1 if bos is not None else 0)
    stream = leading_tokens(tokenizer, text, tokens)
    n = stream.numel() // body
    if n == 0:
        raise DataError(f"evaluation text has {stream.numel()} tokens, fewer than one window of {window}")
    windows = stream[: n * body].view(n, body)
    if bos is not None:
        windows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


LEAD_MARGIN = 64  # ids past the wanted ones that a prefix must give, so the ids next to its cut are never compared


def leading_tokens(tokenizer, text: str, tokens: int) -> torch.Tensor:
    """tokenize_stream(tokenizer, text)[:tokens] without tokenizing a long text whole (an evaluation of 2,048 tokens
    of WikiText-2 tokenized all 1.3 MB of it). A prefix cut at a line break, doubled until it gives enough ids, then
    confirmed by a slightly longer one: a cut changes only the ids next to it, so two cuts that agree on the first
    `tokens` ids agree with the whole text. The whole text when it is short, has no line breaks, or they disagree."""
    size, previous, last_cut = 8 * tokens + 4096, None, 0  # characters: more than `tokens` ids in a text of words
    while size < len(text) // 2:
        cut = text.rfind("\n", 0, size)
        if cut > last_cut:
            last_cut = cut
            ids = tokenize_stream(tokenizer, text[:cut])
            if ids.numel() >= tokens + LEAD_MARGIN:
                if previous is not None and torch.equal(previous, ids[:tokens]):
                    return previous
                previous, size = ids[:tokens], cut + 4096  # the next cut, past this one, confirms it
                continue
        size *= 2
    return tokenize_stream(tokenizer, text)[:tokens]
