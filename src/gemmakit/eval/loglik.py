"""Log-likelihoods of continuations: what multiple-choice scoring and perplexity rest on.

A multiple-choice item is one context and K continuations. The context runs once through a KV
cache; its last logits score every continuation's first token, and the remaining tokens of all K
continuations run as one batch against K copies of the context's cache. Successive contexts that
share a prefix (the few-shot examples of an MMLU subject) reuse the cached part.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from ..model import KVCache


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context ids (with BOS) and continuation ids, split the way lm-eval splits them.

    Trailing spaces of the context belong to the continuation (" A", not "A" after a space), and
    the continuation's ids are the tail of the whole text's ids, so a token that straddles the
    boundary is scored as the model would read it.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


class Scorer:
    """Scores continuations for one model, keeping the last context's cache for the next call."""

    def __init__(self, lm, block: int = 512):
        self.lm = lm
        self.block = block  # cache lengths are rounded up to this, so most items reuse the cache
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # ids whose keys/values row 0 holds, from position 0
        self.written = 0  # one past the highest position written into row 0 since its last prefill

    @torch.inference_mode()
    def loglikelihoods(self, context: list[int], continuations: list[list[int]]) -> list[tuple[float, bool]]:
        """(sum of log-probs, whether every token is the argmax) for each continuation after context."""
        if not context:
            raise DataError("a context needs at least one token (BOS)")
        if not continuations or any(len(c) == 0 for c in continuations):
            raise DataError("every continuation needs at least one token")
        K, L = len(continuations), max(len(c) for c in continuations)
        limit = self.lm.config.max_seq_len
        if len(context) + L - 1 > limit:  # keep the end of the context, as lm-eval does
            context = context[len(context) + L - 1 - limit:]
        last = self._prefill(context, K, len(context) + L - 1)
        logp = torch.log_softmax(last, dim=-1)  # (V,) scores each continuation's first token
        first = [(float(logp[c[0]]), int(last.argmax()) == c[0]) for c in continuations]
        if L == 1:
            return first
        out = [[lp] for lp, _ in first], [[g] for _, g in first]
        cache, module, C = self.cache, self.lm.module, len(context)
        cache.copy_row(0, slice(1, K))  # every row starts from row 0's context
        pad = self.lm.tokenizer.pad_id if self.lm.tokenizer is not None else 0
        feed = torch.tensor([c[:-1] + [pad] * (L - len(c)) for c in continuations], device=self.lm.device)  # (K, L-1)
        target = torch.tensor([c[1:] + [-1] * (L - len(c)) for c in continuations], device=self.lm.device)  # (K, L-1)
        for s in range(0, L - 1, cache.max_chunk):
            chunk = feed[:, s:s + cache.max_chunk]
            pos = torch.arange(C + s, C + s + chunk.shape[1], device=chunk.device).expand(K, -1)
            logits = module(chunk, pos, cache).float()  # (K, T, V)
            lp = torch.log_softmax(logits, dim=-1)
            tgt = target[:, s:s + chunk.shape[1]]
            picked = lp.gather(-1, tgt.clamp(min=0)[..., None])[..., 0]  # (K, T)
            greedy = logits.argmax(-1) == tgt
            for k in range(K):
                n = int((tgt[k] >= 0).sum())
                out[0][k].append(float(picked[k, :n].sum()))
                out[1][k].append(bool(greedy[k, :n].all()))
        self.written = max(self.written, C + L - 1)
        return [(sum(lps), all(gs)) for lps, gs in zip(*out)]

    def _prefill(self, context: list[int], rows: int, length: int) -> torch.Tensor:
        """Fills row 0 with the context, reusing what it shares with the last one; its last logits (V,)."""
        cfg = self.lm.config
        need = -(-length // self.block) * self.block
        if self.cache is None or self.cache.batch_size != rows or self.cache.max_len < length:
            # No ring for sliding layers: an MMLU subject's few-shot prefix is often longer than
            # the window, and a ring would have overwritten it by the next item.
            self.cache = KVCache(cfg, rows, min(need, max(length, cfg.max_seq_len)),
                                 dtype=self.lm.dtype, device=self.lm.device, ring=False)
            self.cached, self.written = [], 0
        cache = self.cache
        keep = cache.reusable(self.cached, self.written, context)
        cache.truncate(0, keep)
        view, module, logits = cache.row_view(0), self.lm.module, None
        for s in range(keep, len(context), cache.max_chunk):
            chunk = torch.tensor(context[s:s + cache.max_chunk], device=self.lm.device)[None]
            pos = torch.arange(s, s + chunk.shape[1], device=chunk.device)[None]
            last = s + cache.max_chunk >= len(context)
            logits = module(chunk, pos, view, last_only=True, logits=last)  # earlier chunks: cache only
        self.cached, self.written = list(context), len(context)
        return logits[0, -1].float()

    @torch.inference_mode()
    def rolling(self, ids: list[int], window: int | None = None) -> list[float]:
        """Log-prob of every token of `ids` (a document, BOS first, not itself scored), in disjoint
        windows of at most `window` tokens that each start over from BOS. lm-eval's
        loglikelihood_rolling differs after the first window: it starts a window from the previous
        token without BOS, and fills the last, shorter window with earlier tokens as context. We
        keep BOS because Gemma's predictions without it are far off; the two agree for documents
        that fit one window (under 32k tokens for the bridge, under `window` for perplexity)."""
        window = min(window or self.lm.config.max_seq_len, self.lm.config.max_seq_len)
        bos, body = ids[0], ids[1:]
        out: list[float] = []
        for s in range(0, len(body), window):
            piece = body[s:s + window]
            logits = self.lm.logits([bos] + piece[:-1])[0]  # (T, V)
            lp = torch.log_softmax(logits, dim=-1)
            out += lp.gather(-1, torch.tensor(piece, device=lp.device)[:, None])[:, 0].tolist()
        return out

