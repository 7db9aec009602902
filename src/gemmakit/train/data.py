"""Training data: files to documents, documents to token files on disk, token files to batches.

A *source* is one entry of `--data`: a file, a folder (its text and code files) or a glob, with an
optional weight (`path:2.5`). Each source is tokenized once into a memory-mapped file of fixed-length
rows, so a corpus is never held in RAM; the last `val_fraction` of each source's rows is held out.
Batches come from an order fixed by the seed: sample i of the run is the same on every run, on
every number of processes, and after a resume.

Each token file has a segments file beside it: the document (text) or conversation (chat) each
token belongs to, numbered from 0 within its row, so that a batch can be packed cleanly: positions
restart at each document and attention stays inside it (`collate(..., clean=True)`).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError
from ..model.loss import IGNORE  # the target of positions that carry no loss
from ..paths import atomic_path, fingerprint

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".cpp", ".js", ".ts", ".rs", ".go", ".java",
                 ".sh", ".toml", ".cfg", ".ini", ".tex", ".html", ".css", ".jsonl", ""}


@dataclass(frozen=True)
class SourceSpec:
    pattern: str
    weight: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> SourceSpec:
        """'path', or 'path:weight' (the weight is read only when what follows the last ':' is a number)."""
        head, sep, tail = spec.rpartition(":")
        if sep:
            try:
                weight = float(tail)
            except ValueError:
                return cls(spec)
            if not weight > 0:
                raise DataError(f"{spec}: a source's weight must be positive, got {tail}")
            return cls(head, weight)
        return cls(spec)

    def files(self) -> list[Path]:
        """The files of this source, sorted; a folder gives its text and code files, recursively."""
        path = Path(self.pattern)
        if path.is_file():
            return [path]
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                     and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(path).parts)]
        else:
            found = [Path(p) for p in glob.glob(self.pattern, recursive=True) if Path(p).is_file()]
        if not found:
            raise DataError(f"{self.pattern}: no such file, or no text files there")
        return sorted(found)


def documents(spec: SourceSpec, field: str = "text", files: list[Path] | None = None) -> Iterator[tuple[str, object]]:
    """(where, document) pairs: a whole file is one document; a .jsonl line is one (its `field`).

    Files named one by one must be readable UTF-8; in folders and globs, files that are not UTF-8
    (test fixtures in other encodings, binaries with a text suffix) are skipped.
    """
    files = spec.files() if files is None else files
    named = Path(spec.pattern).is_file()
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if named:
                raise DataError(f"{path}: not UTF-8 text") from None
            continue
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
        if path.suffix != ".jsonl":
            if field == "text":
                yield str(path), text
            else:
                raise DataError(f"{path}: chat data must be JSONL with a '{field}' list per line")
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{n}: a JSON object with a '{field}' field was expected")
            yield f"{path}:{n}", record[field]


# -- token files -------------------------------------------------------------------------------------
FORMAT = 2  # of the token files; part of their names, so that files of an older layout are rebuilt


@dataclass
class TokenRows:
    """One source on disk: rows of seq_len + 1 token ids, (chat data) which of them carry loss, and
    which document each token is in."""
    tokens: np.ndarray  # (N, seq_len + 1) uint32, memory-mapped
    loss_mask: np.ndarray | None  # (N, seq_len + 1) bool, memory-mapped; None: every position counts
    weight: float
    name: str
    segments: np.ndarray | None = None  # (N, seq_len + 1), memory-mapped, 0.. within a row; None: one document a row

    def __len__(self) -> int:
        return len(self.tokens)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        return (self.tokens[i], self.loss_mask[i] if self.loss_mask is not None else None,
                self.segments[i] if self.segments is not None else None)


def _segment_dtype(seq_len: int) -> type:
    return np.uint16 if seq_len < 2**16 - 1 else np.uint32  # a row holds at most seq_len + 1 documents


def _open_rows(stem: Path, seq_len: int, masked: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    n = os.path.getsize(stem.with_suffix(".tokens")) // (4 * (seq_len + 1))
    shape = (n, seq_len + 1)
    tokens = np.memmap(stem.with_suffix(".tokens"), dtype=np.uint32, mode="r", shape=shape)
    mask = np.memmap(stem.with_suffix(".mask"), dtype=np.bool_, mode="r", shape=shape) if masked else None
    segments = np.memmap(stem.with_suffix(".segments"), dtype=_segment_dtype(seq_len), mode="r", shape=shape)
    return tokens, mask, segments


def pack_text(spec: SourceSpec, encode: Callable[[str], list[int]], eos_id: int, seq_len: int, cache: Path,
              tokenizer_key: str = "", seed: int = 0, progress: bool = True) -> TokenRows:
    """A text/code source as rows of seq_len + 1 tokens: files in a seeded order, each document followed
    by <eos>, cut into consecutive rows (the last token of a row is the first of the next, so every
    token is a target once). Tokenized once; later runs reuse the file."""
    files = spec.files()
    stem = cache / f"text-{fingerprint(files, {'seq_len': seq_len, 'seed': seed, 'tok': tokenizer_key, 'format': FORMAT})}"
    if not stem.with_suffix(".tokens").exists():
        # The segments file is renamed into place first: the tokens file marks the pair done.
        with atomic_path(stem.with_suffix(".tokens")) as tmp, atomic_path(stem.with_suffix(".segments")) as tmp_seg:
            carry: list[int] = []
            docs: list[int] = []  # the document number of each token in carry
            n_rows = n_docs = 0
            # Files are shuffled, then streamed one document at a time: the held-out tail is a
            # random set of files, and the corpus never sits in memory.
            shuffled = [files[i] for i in np.random.default_rng(seed).permutation(len(files))]
            window = partial(np.lib.stride_tricks.sliding_window_view, window_shape=seq_len + 1)
            with open(tmp, "wb") as f, open(tmp_seg, "wb") as f_seg:
                for _, text in tqdm(documents(spec, files=shuffled), desc=f"tokenizing {spec.pattern}", unit="doc",
                                    disable=not progress, leave=False):
                    ids = encode(text) + [eos_id]
                    carry += ids
                    docs += [n_docs] * len(ids)
                    n_docs += 1
                    n_full = (len(carry) - 1) // seq_len
                    if n_full:
                        window(np.asarray(carry, np.uint32))[::seq_len][:n_full].tofile(f)
                        rows_doc = window(np.asarray(docs, np.int64))[::seq_len][:n_full]
                        (rows_doc - rows_doc[:, :1]).astype(_segment_dtype(seq_len)).tofile(f_seg)
                        n_rows += n_full
                        carry, docs = carry[n_full * seq_len:], docs[n_full * seq_len:]
            if n_rows == 0:
                raise DataError(f"{spec.pattern}: {len(carry)} tokens, fewer than one sequence of {seq_len + 1}; "
                                "use more data or a smaller --seq-len")
    tokens, _, segments = _open_rows(stem, seq_len, masked=False)
    return TokenRows(tokens, None, spec.weight, spec.pattern, segments)


def pack_chats(spec: SourceSpec, render: Callable[[object, str], tuple[list[int], list[bool]]], pad_id: int,
               seq_len: int, cache: Path, tokenizer_key: str = "", progress: bool = True) -> TokenRows:
    """A chat source as rows of seq_len + 1 tokens: whole conversations packed greedily, in file
    order, padded at the end of a row; `render` gives each conversation's ids and loss mask. The
    padding is a segment of its own."""
    files = spec.files()
    stem = cache / f"chat-{fingerprint(files, {'seq_len': seq_len, 'tok': tokenizer_key, 'format': FORMAT})}"
    if not stem.with_suffix(".tokens").exists():
        cache.mkdir(parents=True, exist_ok=True)
        rows_t: list[np.ndarray] = []
        rows_m: list[np.ndarray] = []
        rows_s: list[np.ndarray] = []
        row_t: list[int] = []
        row_m: list[bool] = []
        row_s: list[int] = []

        def flush() -> None:
            nonlocal row_t, row_m, row_s
            if row_t:
                pad = seq_len + 1 - len(row_t)
                rows_t.append(np.asarray(row_t + [pad_id] * pad, np.uint32))
                rows_m.append(np.asarray(row_m + [False] * pad, np.bool_))
                rows_s.append(np.asarray(row_s + [row_s[-1] + 1] * pad, _segment_dtype(seq_len)))
                row_t, row_m, row_s = [], [], []

        for where, messages in tqdm(documents(spec, field="messages"), desc=f"rendering {spec.pattern}", unit="chat",
                                    disable=not progress, leave=False):
            ids, mask = render(messages, where)
            if len(ids) > seq_len + 1:
                raise DataError(f"{where}: the conversation is {len(ids)} tokens, longer than a sequence "
                                f"({seq_len + 1}); raise --seq-len or shorten it")
            if len(row_t) + len(ids) > seq_len + 1:
                flush()
            row_s += [row_s[-1] + 1 if row_s else 0] * len(ids)
            row_t += ids
            row_m += mask
        flush()
        if not rows_t:
            raise DataError(f"{spec.pattern}: no conversations")
        for suffix, rows in ((".mask", rows_m), (".segments", rows_s), (".tokens", rows_t)):  # the tokens last: they mark the set done
            with atomic_path(stem.with_suffix(suffix)) as tmp:
                np.stack(rows).tofile(tmp)
    tokens, mask, segments = _open_rows(stem, seq_len, masked=True)
    return TokenRows(tokens, mask, spec.weight, spec.pattern, segments)


# -- splits, order and batches ---------------------------------------------------------------------
def split(sources: list[TokenRows], val_fraction: float) -> tuple[list[range], list[range]]:
    """Per source, the rows used for training and the held-out rows (the last val_fraction)."""
    train, held = [], []
    for s in sources:
        n_val = int(round(len(s) * val_fraction)) if len(s) > 1 else 0
        if val_fraction > 0 and len(s) > 1:
            n_val = max(n_val, 1)
        train.append(range(0, len(s) - n_val))
        held.append(range(len(s) - n_val, len(s)))
    return train, held


def sample_order(sources: list[TokenRows], train_rows: list[range], n_samples: int, seed: int) -> np.ndarray:
    """(n_samples, 2) array of (source, row): sources drawn by weight, each source's rows in a fresh
    seeded permutation per epoch. A pure function of its arguments, hence exact resumes."""
    weights = np.array([s.weight if len(r) else 0.0 for s, r in zip(sources, train_rows)])
    if weights.sum() == 0:
        raise DataError("no training rows left after the held-out split; use more data or --val-fraction 0")
    rng = np.random.default_rng([seed, 0])
    which = rng.choice(len(sources), size=n_samples, p=weights / weights.sum())
    order = np.empty((n_samples, 2), np.int64)
    order[:, 0] = which
    for s, rows in enumerate(train_rows):
        at = np.flatnonzero(which == s)
        if not len(at):
            continue
        epochs = -(-len(at) // len(rows))
        perm = np.concatenate([np.random.default_rng([seed, 1, s, e]).permutation(len(rows)) for e in range(epochs)])
        order[at, 1] = rows.start + perm[: len(at)]
    return order


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T), IGNORE where no loss is taken
    positions: torch.Tensor | None = None  # (B, T), restarting at 0 in each document; None: 0..T-1
    segments: torch.Tensor | None = None  # (B, T), each token's document; None: a row attends as one

    def to(self, device) -> Batch:
        return Batch(**{name: t.to(device) if t is not None else None for name, t in vars(self).items()})


def collate(sources: list[TokenRows], picks: np.ndarray, clean: bool = False) -> Batch:
    """(source, row) pairs -> a batch. clean: each document of a row (conversation, or text
    document) gets positions from 0 and its own segment, so that it attends only to itself, as if
    it were trained alone."""
    rows, masks, segs = zip(*(sources[s].row(r) for s, r in picks))
    tokens = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
    targets = tokens[:, 1:].clone()
    if any(m is not None for m in masks):
        mask = torch.from_numpy(np.stack([m if m is not None else np.ones_like(r, np.bool_) for r, m in zip(rows, masks)]))
        targets[~mask[:, 1:]] = IGNORE
    if not clean:
        return Batch(tokens[:, :-1], targets)
    segments = torch.from_numpy(np.stack([s if s is not None else np.zeros(len(r), np.int64) for r, s in zip(rows, segs)])
                                .astype(np.int64))[:, :-1]  # (B, T)
    index = torch.arange(segments.shape[1]).expand_as(segments)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, 0).cummax(dim=1).values  # where each token's document starts
    return Batch(tokens[:, :-1], targets, index - first, segments)
