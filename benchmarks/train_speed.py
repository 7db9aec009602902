"""Training speed on CPU: gemmakit's training step against transformers' GemmaForCausalLM, same
config, batch, loss and optimizer (AdamW, fused: what `gemmakit train` and transformers' Trainer
both use by default), float32. The two are timed in alternation, step by
step, so that load from other processes falls on both alike. Prints a table of tokens/s.

    python benchmarks/train_speed.py [--steps 10] [--threads 2] [--no-compile]

gemmakit's step is the one `gemmakit train` takes: `model(x, targets=y)`, whose loss never holds
the (B, T, V) logits (see src/gemmakit/model/loss.py); "compiled" is `gemmakit train --compile`.
"""

from __future__ import annotations

import argparse
import copy
import time
from functools import partial

import torch

from gemmakit.config import GemmaConfig
from gemmakit.model import Gemma

CONFIG = GemmaConfig(family="gemma", vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=1,
                     head_dim=64, ffn_dim=1024, max_seq_len=1024)


def hf_model(c: GemmaConfig):
    import transformers

    hf = transformers.GemmaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
                                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                  num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
                                  max_position_embeddings=c.max_seq_len, hidden_activation="gelu_pytorch_tanh",
                                  attention_dropout=0.0)
    hf._attn_implementation = "sdpa"
    return transformers.GemmaForCausalLM(hf)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast on both sides (`gemmakit train --bf16`)")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="skip gemmakit under torch.compile (which spends ~30 s compiling first)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    ours = Gemma(CONFIG)
    ours.reset_parameters()
    theirs = hf_model(CONFIG)
    theirs.load_state_dict({"model." + k.replace("embed.", "embed_tokens.").replace(".attn.", ".self_attn.")
                           .replace("attn_norm", "input_layernorm").replace("mlp_norm", "post_attention_layernorm")
                           .replace("layers.", "layers."): v for k, v in ours.state_dict().items()}
                           | {"lm_head.weight": ours.embed.weight.detach()}, strict=True)
    adamw = partial(torch.optim.AdamW, lr=1e-4, fused=True)
    opts = {"gemmakit": adamw(ours.parameters()), "transformers": adamw(theirs.parameters())}
    if args.compile:  # the same weights in a second copy, so that each copy has its own optimizer
        ours_c = copy.deepcopy(ours)
        compiled = torch.compile(ours_c)
        opts["gemmakit, compiled"] = adamw(ours_c.parameters())

    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=args.bf16)

    def step_ours(x, y):
        with autocast():
            loss = ours(x, targets=y) / y.numel()
        loss.backward()
        return loss

    def step_theirs(x, y):
        with autocast():
            loss = theirs(input_ids=x, labels=None, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(loss.flatten(0, 1), y.flatten())
        loss.backward()
        return loss

    def step_compiled(x, y):
        with autocast():
            loss = compiled(x, targets=y) / y.numel()
        loss.backward()
        return loss

    steps = {"gemmakit": step_ours, "transformers": step_theirs}
    if args.compile:
        steps["gemmakit, compiled"] = step_compiled
    times = {k: [] for k in steps}
    losses = {k: [] for k in steps}
    g = torch.Generator().manual_seed(0)
    for i in range(args.steps + 2):  # the first two steps of each warm up allocators and caches
        tokens = torch.randint(0, CONFIG.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
        x, y = tokens[:, :-1], tokens[:, 1:]
        for name, fn in steps.items():
            t = time.perf_counter()
            loss = fn(x, y)
            torch.nn.utils.clip_grad_norm_(opts[name].param_groups[0]["params"], 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i >= 2:
                times[name].append(time.perf_counter() - t)
            losses[name].append(float(loss))
    tokens_per_step = args.batch_size * args.seq_len
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"config: d_model {CONFIG.d_model}, {CONFIG.n_layers} layers, vocab {CONFIG.vocab_size} ({n_params / 1e6:.1f}M "
          f"parameters); batch {args.batch_size} x {args.seq_len} tokens; fused AdamW; {'bfloat16 autocast' if args.bf16 else 'float32'}; {args.threads} threads; "
          f"{args.steps} timed steps")
    for name in losses:
        if name != "transformers":
            diff = max(abs(a - b) for a, b in zip(losses[name], losses["transformers"]))
            print(f"max |loss difference| between {name} and transformers over the run: {diff:.2e}")
    print("| implementation | median s/step | tokens/s | speed-up |")
    print("|---|---|---|---|")
    base = sorted(times["transformers"])[len(times["transformers"]) // 2]
    for name, ts in times.items():
        med = sorted(ts)[len(ts) // 2]
        print(f"| {name} | {med:.3f} | {tokens_per_step / med:,.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
