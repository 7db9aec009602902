"""gemmakit as a model of EleutherAI's lm-eval harness (`--model gemmakit`).

Importing this module registers the class. From Python:

    import gemmakit.eval.lm_eval_bridge, lm_eval
    lm_eval.simple_evaluate(model="gemmakit", model_args="pretrained=model.gguf", tasks=[...])

From the shell, `python -m gemmakit.eval.lm_eval_bridge run --model gemmakit --model_args
pretrained=model.gguf --tasks ...` is lm-eval's own command line with the class registered.

Log-likelihoods go through the same `Scorer` as gemmakit's harness: requests that share a context
are scored together against one cached prefill; generation is `LM.generate`.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import LM as HarnessLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..runtime.sampling import Sampling
from .loglik import Scorer, encode_pair


@register_model("gemmakit")
class GemmakitLM(HarnessLM):
    def __init__(self, pretrained: str | None = None, lm=None, dtype: str | None = None, device: str = "cpu",
                 tokenizer: str | None = None, quantize: str = "auto", batch_size: int | str = 8,
                 max_gen_toks: int = 256, max_batch_size: int | None = None):
        """model_args of `--model gemmakit` (an unknown one is an error, not ignored): pretrained,
        dtype, device, tokenizer, quantize (auto, int8, int4 or none: gemmakit.load's), batch_size,
        max_gen_toks. max_batch_size is lm-eval's cap on an automatic batch size, which this model
        does not pick: the batch is batch_size."""
        super().__init__()
        if lm is None:
            from ..checkpoints.default import default_model_path
            from ..lm import load

            lm = load(pretrained or default_model_path(), dtype=dtype, device=device, tokenizer=tokenizer,
                      quantize=None if quantize == "none" else quantize, progress=False)
        self.lm = lm
        self.scorer = Scorer(lm)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.args[0], []).append(i)
        # Contexts in sorted order, so that few-shot prompts with a common start follow each other
        # and reuse the cached prefix.
        for context in tqdm(sorted(groups), desc="gemmakit loglikelihood", disable=disable_tqdm):
            idx = groups[context]
            pairs = [encode_pair(self.lm.tokenizer, context, requests[i].args[1]) for i in idx]
            # Contexts ending in spaces give continuations different context ids; score by context ids.
            by_ctx: dict[tuple, list[int]] = {}
            for j, (ctx, _) in enumerate(pairs):
                by_ctx.setdefault(tuple(ctx), []).append(j)
            for ctx, js in by_ctx.items():
                scored = self.scorer.loglikelihoods(list(ctx), [pairs[j][1] for j in js])
                for j, s in zip(js, scored):
                    results[idx[j]] = s
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [sum(self.scorer.rolling(self.lm.tokenizer.encode(r.args[0])))
                for r in tqdm(requests, desc="gemmakit rolling", disable=disable_tqdm)]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items(), key=str)), []).append(i)
        bar = tqdm(total=len(requests), desc="gemmakit generate", disable=disable_tqdm)
        for idx in groups.values():
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            sampling = Sampling(temperature=temperature, top_p=kwargs.get("top_p"), top_k=kwargs.get("top_k"))
            texts = self.lm.generate([requests[i].args[0] for i in idx], sampling=sampling, stop=until,
                                     max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                                     max_batch=self.batch_size)
            for i, t in zip(idx, texts):
                out[i] = t
            bar.update(len(idx))
        bar.close()
        return out


def local_mc_task(folder, name: str, data, text: str = "{{question}}", choices="{{choices}}",
                  metrics=("acc", "acc_norm")):
    """Writes `folder/name.yaml`: an lm-eval multiple-choice task over a local JSONL file (no hub).

    text and choices are lm-eval's doc_to_text and doc_to_choice (Jinja over the JSONL's fields,
    or a list of choices); the target is the `answer` field. Returns the YAML's path.
    """
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    # JSON strings and lists are YAML too: no quoting rules of our own.
    path.write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
                    f"test_split: test\noutput_type: multiple_choice\ndoc_to_text: {json.dumps(text)}\n"
                    f"doc_to_choice: {json.dumps(choices)}\ndoc_to_target: answer\nmetric_list:\n"
                    + "".join(f"  - metric: {m}\n" for m in metrics))
    return path


def evaluate_local(model, folder, name: str) -> dict:
    """`lm_eval.simple_evaluate` of task `name` from `folder` alone (lm-eval's own tasks not
    loaded), zero-shot, with every item's sample logged."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, tasks=[name], num_fewshot=0, log_samples=True,
                                   task_manager=TaskManager(include_path=str(folder), include_defaults=False))


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    sys.exit(cli_evaluate())
