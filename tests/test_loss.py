"""The blockwise output-layer cross-entropy equals the plain one: loss and both gradients, with
soft-capping and ignored positions, over several blocks; and through the model's `targets`."""

import pytest
import torch
import torch.nn.functional as F

from gemmakit.config import GemmaConfig
from gemmakit.model import Gemma, loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Each test twice: with gemmakit's cross-entropy kernel, and with the torch ops that stand in
    where it cannot be built."""
    if request.param == "torch":
        monkeypatch.setattr(loss.kernels, "softmax_cross_entropy_", lambda z, targets, softcap: None)
    else:
        assert loss.kernels.extension() is not None, "gemmakit's kernels did not build on this machine"
    return request.param


def plain(h, w, t, softcap):
    z = F.linear(h, w).double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z, t, reduction="sum", ignore_index=loss.IGNORE)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_loss_and_gradients_equal_the_plain_cross_entropy(softcap, monkeypatch, path):
    monkeypatch.setattr(loss, "_rows_per_block", lambda vocab: 128)
    torch.manual_seed(0)
    n, d, V = 300, 16, 50  # 300 rows: three blocks of 128, the last one partial
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    t = torch.randint(0, V, (n,))
    t[::7] = loss.IGNORE
    got = loss.linear_cross_entropy(h, w, t, softcap)
    (got * 0.5).backward()  # a non-unit upstream gradient, as a mean over tokens gives
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    want = plain(h, w, t, softcap)
    (want * 0.5).backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gh, h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(loss.linear_cross_entropy(h, w, t, softcap), got.detach())


def test_under_autocast_the_products_run_in_bfloat16_like_the_plain_loss(monkeypatch, path):
    monkeypatch.setattr(loss, "_rows_per_block", lambda vocab: 128)
    torch.manual_seed(0)
    n, d, V = 300, 64, 500
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(V, d, requires_grad=True)
    t = torch.randint(0, V, (n,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss.linear_cross_entropy(h, w, t)
        got.backward()
        gh, gw = h.grad.clone(), w.grad.clone()
        h.grad = w.grad = None
        want = F.cross_entropy(F.linear(h, w).float(), t, reduction="sum")  # what autocast gives the plain way
        want.backward()
    assert got.dtype == gw.dtype == gh.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # float32 products would miss by ~1e-4
    torch.testing.assert_close(gh, h.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, w.grad, rtol=2e-2, atol=2e-2)


def test_model_targets_give_the_loss_of_the_logits(path):
    config = GemmaConfig(family="gemma2", vocab_size=97, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                         head_dim=16, ffn_dim=64, max_seq_len=64, final_logit_softcap=30.0)
    torch.manual_seed(0)
    model = Gemma(config)
    tokens = torch.randint(0, 97, (2, 20))
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = loss.IGNORE
    got = model(tokens, targets=targets)
    got.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    want = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), reduction="sum")
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
