"""Cross-entropy of the output layer, computed a block of rows at a time.

The plain way, `F.cross_entropy(h @ E^T, targets)`, materialises (N, V) logits, their log-softmax
and their gradient: three N x V float32 tensors (12 GB for 4k tokens of Gemma's 262k vocabulary),
each written and read in its own pass. Here each block of rows makes its logits, loss and
gradients while they are hot in cache and frees them; the backward pass only scales gradients
the forward pass already has. The matrix products are the same as the plain way's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the target of positions that carry no loss, as in F.cross_entropy


def _rows_per_block(vocab: int) -> int:
    # About 8 MB of float32 logits a block, but never fewer than 128 rows: each block reads the
    # whole output matrix, and fewer rows would make that read, not the arithmetic, the cost.
    return max(128, (1 << 21) // vocab)


def _block(h, weight, targets, softcap):
    """Logits of one block of rows -> (summed loss, d loss / d logits before the soft-cap).
    Every target is a token: ignored positions were dropped before."""
    z = F.linear(h, weight).float()  # (n, V)
    capped = None
    if softcap is not None:
        capped = torch.tanh(z / softcap)
        z = softcap * capped
    z = torch.log_softmax(z, dim=-1)
    picked = targets[:, None]
    loss = -z.gather(1, picked).sum()
    grad = z.exp_()  # softmax - one_hot(target): the gradient of the loss in the logits
    grad.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad.dtype))
    if softcap is not None:
        grad.mul_(1 - capped * capped)
    return loss, grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, softcap):
        ctx.weight_dtype = weight.dtype
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        rows = _rows_per_block(weight.shape[0])
        for s in range(0, h.shape[0], rows):
            hb = h[s: s + rows]
            loss, grad = _block(hb, weight, targets[s: s + rows], softcap)
            total += loss
            if grad_h is not None:
                grad_h[s: s + rows] = grad.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(grad.t(), hb.float())
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of logits `softcap * tanh(h @ weight^T / softcap)` (no cap if None)
    against targets; positions whose target is IGNORE carry no loss.

    h (..., d), weight (V, d), targets (...) -> a float32 scalar. Equal to
    `F.cross_entropy(logits.float(), targets, reduction="sum")` to float tolerance.
    """
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    keep = targets != IGNORE
    if not bool(keep.all()):  # chat data: the prompt's rows need no logits at all
        h, targets = h[keep], targets[keep]
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, softcap)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    rows = _rows_per_block(weight.shape[0])
    for s in range(0, h.shape[0], rows):
        total += _block(h[s: s + rows], weight, targets[s: s + rows], softcap)[0]
    return total
