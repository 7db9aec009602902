"""Decode at batch 1 against the memory-bandwidth roof (issue 4's GPU deliverable).

A decode step at batch 1 reads every weight once, so its best possible speed is
bandwidth / weight bytes tokens/s. This script measures the device's bandwidth (a large on-device
copy: bytes read + bytes written per second), runs `gemmakit bench`'s own measurement (the
generation engine, as users run it) on a model of random weights, and prints decode b1 as a
share of that roof (target: >= 70% for a gemma-2b-sized model in bfloat16).

    python benchmarks/gpu_roofline.py [--preset gemma-2b] [--dtype bfloat16] [--device cuda] [--compile]

It runs on the CPU too (`--device cpu --preset gemma-tiny`), which is how the test suite checks it.
"""

from __future__ import annotations

import argparse
import time

import torch

import gemmakit
from gemmakit.bench import measure, sync


def bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes per second of a device-to-device copy of `nbytes` (read and write both counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * 4 * repeats / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="gemma-2b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (`--compile`)")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--copy-mb", type=int, default=1024, help="size of the bandwidth probe")
    args = ap.parse_args(argv)
    lm = gemmakit.load(args.preset, dtype=args.dtype, device=args.device, compile="torch" if args.compile else None,
                       progress=False)
    weights = lm.nbytes()
    bw = bandwidth(lm.device, args.copy_mb * 2**20)
    result = measure(lm, args.prefill_tokens, args.decode_tokens, (1,))
    roof = bw / weights  # tokens/s if a step did nothing but read the weights once
    result |= {"weights_gb": weights / 1e9, "bandwidth_gb_s": bw / 1e9, "roof_tok_s": roof,
               "share_of_roof": result["decode_b1_tok_s"] / roof}
    name = torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else "cpu"
    print(f"{args.preset}, {args.dtype}, {name}{', compiled' if args.compile else ''}: "
          f"{weights / 1e9:.2f} GB of weights, measured bandwidth {bw / 1e9:.0f} GB/s")
    print("| prefill tok/s | decode b1 tok/s | roof tok/s | share of roof |")
    print("|---|---|---|---|")
    print(f"| {result['prefill_tok_s']:,.0f} | {result['decode_b1_tok_s']:,.1f} | {roof:,.1f} | "
          f"{result['share_of_roof']:.0%} |")
    return result


if __name__ == "__main__":
    main()
