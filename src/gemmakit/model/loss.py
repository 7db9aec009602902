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

from .. import kernels

IGNORE = -100  # the target of positions that carry no loss, as in F.cross_entropy


def _rows_per_block(vocab: int) -> int:
    # About 8 MB of float32 logits a block, but never fewer than 128 rows: each block reads the
    # whole output matrix, and fewer rows would make that read, not the arithmetic, the cost.
    return max(128, (1 << 21) // vocab)


def _block(h, weight, targets, softcap):
    """Logits of one block of rows -> (summed loss, d loss / d logits before the soft-cap).
    Every target is a token: ignored positions were dropped before."""
    z = F.linear(h, weight)  # (n, V)
    loss = kernels.softmax_cross_entropy_(z, targets, softcap)  # one pass; the gradient replaces z
    if loss is not None:
        return loss.sum(), z
    z = z.float()
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


# A custom op rather than an autograd.Function: torch.compile calls it as it is. Traced, its
# in-place accumulation became copies of the whole (V, d) gradient for every block (functional
# graphs; ~22 ms a step in benchmarks/train_speed.py); and it needs no torch._dynamo import.
@torch.library.custom_op("gemmakit::linear_cross_entropy", mutates_args=())
def _loss_and_grads(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
                    dtype: torch.dtype, want_h: bool, want_w: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h (N, d), targets (N,) -> summed loss, d loss / d h (N, d) and d loss / d weight (V, d,
    float32); a gradient not wanted is an empty tensor. The matrix products run in `dtype` (the
    autocast dtype under autocast), the softmax in float32."""
    with torch.autocast(h.device.type, enabled=False):  # eager autocast would cast every block again
        return _blocks(h, weight, targets, softcap, dtype, want_h, want_w)


def _blocks(h, weight, targets, softcap, dtype, want_h, want_w):
    keep = targets != IGNORE
    kept = None if bool(keep.all()) else keep.nonzero().squeeze(1)  # chat data: skip the prompt's rows
    hk, tk = (h, targets) if kept is None else (h[kept], targets[kept])
    grad_hk = torch.empty_like(hk, dtype=dtype) if want_h else None  # the products' dtype: written in place
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if want_w else weight.new_empty(0, dtype=torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    rows = _rows_per_block(weight.shape[0])
    wc = weight.to(dtype)  # once, not once a block
    for s in range(0, hk.shape[0], rows):
        hb = hk[s: s + rows].to(dtype)
        loss, grad = _block(hb, wc, tk[s: s + rows], softcap)
        total += loss
        grad = grad.to(dtype)
        if want_h:
            torch.mm(grad, wc, out=grad_hk[s: s + rows])
        if dtype == torch.float32 and want_w:
            grad_w.addmm_(grad.t(), hb)
        elif want_w:  # no float32-accumulating product for bfloat16 on CPU: sum the blocks' products
            grad_w += torch.mm(grad.t(), hb)
    if not want_h:
        grad_h = h.new_empty(0)
    elif kept is None:
        grad_h = grad_hk.to(h.dtype)
    else:
        grad_h = torch.zeros_like(h).index_copy_(0, kept, grad_hk.to(h.dtype))
    return total, grad_h, grad_w


@_loss_and_grads.register_fake
def _(h, weight, targets, softcap, dtype, want_h, want_w):
    return (h.new_empty((), dtype=torch.float32), h.new_empty(h.shape if want_h else (0,)),
            weight.new_empty(weight.shape if want_w else (0,), dtype=torch.float32))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.want = inputs[5:7]
    ctx.weight_dtype = inputs[1].dtype


def _backward(ctx, grad_loss, _grad_h, _grad_w):
    grad_h, grad_w = ctx.saved_tensors
    want_h, want_w = ctx.want
    return (grad_h * grad_loss if want_h else None, (grad_w * grad_loss).to(ctx.weight_dtype) if want_w else None,
            None, None, None, None, None)


_loss_and_grads.register_autograd(_backward, setup_context=_setup)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None) -> torch.Tensor:
    """Summed cross-entropy of logits `softcap * tanh(h @ weight^T / softcap)` (no cap if None)
    against targets; positions whose target is IGNORE carry no loss.

    h (..., d), weight (V, d), targets (...) -> a float32 scalar. Equal to
    `F.cross_entropy(logits.float(), targets, reduction="sum")` to float tolerance; under autocast
    the logits' product runs in the autocast dtype, as `F.linear` would.
    """
    grads = torch.is_grad_enabled()
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    loss, _, _ = _loss_and_grads(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), softcap, dtype,
                                 grads and h.requires_grad, grads and weight.requires_grad)
    return loss
