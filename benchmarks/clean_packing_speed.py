"""Six layers of Gemma 3 270M's shapes (random weights, an 8192-token head), bf16 autocast, forward +
backward of 4 x 128 tokens: rows packed plainly vs cleanly (5 conversations a row). CPU time
(process_time), so that other load counts less. python benchmarks/clean_packing_speed.py"""
import time

import torch

from gemmakit.config import PRESETS
from gemmakit.model import Gemma

torch.manual_seed(0)
cfg = PRESETS["gemma3-270m"].replace(vocab_size=8192, n_layers=6)  # 6 layers with the attention shapes of the 270M; a small head
m = Gemma(cfg)
m.embed.weight.requires_grad_(False)
B, T = 4, 128
x = torch.randint(0, 1000, (B, T)); y = torch.randint(0, 1000, (B, T))
seg = (torch.arange(T) // 26).expand(B, T); pos = torch.arange(T).expand(B, T) - seg * 26
def step(clean):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x, pos, targets=y, segments=seg) if clean else m(x, targets=y)
    loss.backward()
for clean in (False, True): step(clean)
res = {False: [], True: []}
for _ in range(3):
    for clean in (False, True):
        t = time.process_time(); step(clean); res[clean].append(time.process_time() - t)
for clean, ts in res.items():
    ts.sort(); print("clean" if clean else "plain", f"median CPU {ts[1]:.2f} s/step", [round(t, 2) for t in ts])
