"""How many output-head rows a screen on the int8 head's top bits leaves for exact re-scoring, on
the real Gemma 3 270M (the default model): the design data for issue 15's "fewer bytes per token".

    python benchmarks/head_screen.py [--rows 128] [--threads 2]

The int8 kernel (kernels/int8_matmul.cpp, VNNI and AMX) forms a logit from exact int32 group dot
products d_g = sum_k w_k x_k (x the activations rounded to int8 per group of 32, scale xs_g; the
weights w with float16 scales ws_g) as sum_g d_g xs_g ws_g. A screen that reads only the top
8 - s bits of u = w + 128 (the kernel's unsigned form) knows d_g up to sum_k low_k x_k with
low_k in [0, 2^s - 1], i.e. exactly within [(2^s - 1) N_g, (2^s - 1) P_g] (N_g, P_g: the group's
sums of negative and positive x). That gives every row an interval [L_r, U_r] holding its logit,
widened by the kernel's float32 rounding (at most (G + 2) 2^-24 sum_g |d_g xs_g ws_g| <=
(G + 2) 2^-24 sum_g 127 |xs_g ws_g| sum_k |x_k|); a row with U_r < max L is never the argmax, so
greedy decoding that re-scores only the other rows exactly is exact. This script counts those
candidate rows on the final-norm hidden states of a real text (teacher-forced: the states decode
steps see), per screen width, and what a decode step would then read of the head.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

WIDTHS = (1, 2, 3, 4)  # s: the low bits of each weight the screen leaves out
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def quantize_rows(x: torch.Tensor, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation rounding (quantize_rows): int8 per group, scale amax / 127."""
    g = x.float().view(x.shape[0], -1, group)
    amax = g.abs().amax(-1)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return torch.round(g * inv[..., None]).clamp(-127, 127), (amax / 127).double()  # (M, G, 32), (M, G)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128, help="hidden states screened (positions of the text)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import gemmakit
    from gemmakit.checkpoints.default import default_model_path

    lm = gemmakit.load(default_model_path(), compile=None, progress=False)
    table = lm.module.embed.table  # the int8 head, (V, d)
    ids = torch.tensor([lm.tokenizer.encode((DATA / "gpl3_preamble.txt").read_text())])
    with torch.inference_mode():
        hidden = lm.module(ids, hidden=True)[0]  # (T, d)
    hidden = hidden[torch.linspace(0, hidden.shape[0] - 1, min(args.rows, hidden.shape[0])).long()]
    V, K = table.weight.shape
    G = K // 32
    u = (table.weight.view(V, G, 32).int() + 128)  # 0..255
    ws = table.scales.double()  # (V, G)
    counts = {s: [] for s in WIDTHS}
    for chunk in tqdm(hidden.split(16), desc="screening", unit="chunk"):  # (16, V, G) float64: ~0.7 GB a tensor
        for s, n in candidates(chunk, u, ws).items():
            counts[s].append(n)
    body = sum(t.numel() * t.element_size() for n, t in lm.module.state_dict().items() if "embed" not in n)
    print(f"{len(hidden)} hidden states of tests/data/gpl3_preamble.txt; head {V} x {K}; int8 head reads "
          f"{V * K / 1e6:.0f} MB (+ {V * G * 2 / 1e6:.1f} MB scales), the rest of a step {body / 1e6:.0f} MB\n")
    print("| screen bits | screen reads MB | candidates median | p90 | p99 | max | <= 256 | <= 4096 |")
    print("|---|---|---|---|---|---|---|---|")
    for s in WIDTHS:
        n = torch.cat(counts[s])
        q = [n.quantile(p).item() for p in (0.5, 0.9, 0.99)]
        print(f"| {8 - s} | {V * K * (8 - s) / 8 / 1e6:.0f} | {q[0]:.0f} | {q[1]:.0f} | {q[2]:.0f} | {n.max().item():.0f} | "
              f"{(n <= 256).double().mean().item():.0%} | {(n <= 4096).double().mean().item():.0%} |")


def candidates(hidden: torch.Tensor, u: torch.Tensor, ws: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per screen width s: each hidden state's number of rows the bound cannot rule out."""
    V, G, _ = u.shape
    xq, xs = quantize_rows(hidden)
    M = xq.shape[0]
    dots = torch.zeros(M, V, G, dtype=torch.float64)
    lows = {s: torch.zeros(M, V, G, dtype=torch.float64) for s in WIDTHS}
    for g in range(G):  # integer dot products in float32: exact below 2^24 (|d| <= 255 * 127 * 32)
        xg = xq[:, g, :].t()  # (32, M)
        dots[:, :, g] = (u[:, g, :].float() @ xg).t().double() - 128 * xq[:, g, :].sum(-1, keepdim=True).double()
        for s in WIDTHS:
            lows[s][:, :, g] = ((u[:, g, :] & (2 ** s - 1)).float() @ xg).t().double()
    pos = xq.clamp(min=0).sum(-1).double()  # (M, G)
    neg = xq.clamp(max=0).sum(-1).double()
    coef = xs[:, None, :] * ws[None, :, :]  # (M, V, G)
    best = (dots * coef).sum(-1).argmax(-1)
    slack = (G + 2) * 2.0 ** -24 * (coef.abs() * 127 * (pos - neg)[:, None, :]).sum(-1)
    out = {}
    for s in WIDTHS:
        known = dots - lows[s]  # d less the bits the screen does not read
        lo_d, hi_d = known + (2 ** s - 1) * neg[:, None, :], known + (2 ** s - 1) * pos[:, None, :]
        lo = torch.minimum(lo_d * coef, hi_d * coef).sum(-1) - slack
        hi = torch.maximum(lo_d * coef, hi_d * coef).sum(-1) + slack
        cand = hi >= lo.max(-1, keepdim=True).values
        assert bool(cand.gather(1, best[:, None]).all()), "the bound excluded the true argmax"
        out[s] = cand.sum(-1).double()
    return out

if __name__ == "__main__":
    main()
