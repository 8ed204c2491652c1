"""Decode speed of the two generation backends (``ppo.generation_backend``): ``eager`` (transformers' generate) and
``compiled`` (a static KV cache and a torch.compile'd decode step, rlhf_ablate/models/decoding.py).

Both run side by side in one process, in alternating order per repeat, on one rollout micro-batch at the bundled
sizes (rlhf_ablate/config/schema.py defaults: ``ppo.rollout_micro_batch_size`` prompts of the bundled PPO data cut to
``ppo.max_prompt_length``, ``ppo.max_new_tokens`` at temperature 1), the built-in tiny Llama with the default 4-bit
quantization and a LoRA adapter, with the same seed for every call, so both backends decode the same tokens (the
script checks it). The first call of each backend is a warm-up (for ``compiled``: the compile) and is reported
apart. Tokens/s counts the response tokens kept (up to EOS or the next-turn header).

    python benchmarks/bench_decode.py --repeats 5          # a few minutes on 2 CPU cores, the compile included
    python benchmarks/bench_decode.py --device cuda        # on a GPU, the same micro-batch
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median, write_result  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--quantization", default="nf4")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (a trial's resources.cpu default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch

    from rlhf_ablate import models as M
    from rlhf_ablate.config import TrialConfig
    from rlhf_ablate.data import load_data
    from rlhf_ablate.models.decoding import compile_unavailable

    torch.set_num_threads(args.threads)
    cfg = TrialConfig().replace(**{"model.base_model": args.model, "model.quantization": args.quantization})
    q = args.quantization != "none"
    tok = M.load_tokenizer(cfg.model, M.ensure_builtin(args.model) if args.model in ("tiny-llama", "tiny-gpt2")
                           else args.model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = M.prepare_for_training(M.load_causal_lm(cfg.model), 8, 16, 0.0, "CAUSAL_LM", q)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0.0, 0.1)
    if args.device == "cuda":
        model = model.to("cuda") if not q else model
    p = cfg.ppo
    prompts = [x.prompt for x in load_data(cfg.data).ppo_prompts][:p.rollout_micro_batch_size]
    why = compile_unavailable()
    backends = ["eager"] + (["compiled"] if why is None else [])

    def run(backend: str) -> tuple[float, int, list]:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with M.autocast(cfg.model):
            out = M.generate(model, tok, prompts, max_new_tokens=p.max_new_tokens, do_sample=True,
                             temperature=p.temperature, batch_size=p.rollout_micro_batch_size,
                             max_prompt_length=p.max_prompt_length, backend=backend)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0, sum(len(o["ids"]) for o in out), [o["ids"] for o in out]

    warm = {b: run(b) for b in backends}
    same = len({str(w[2]) for w in warm.values()}) == 1
    secs: dict[str, list[float]] = {b: [] for b in backends}
    tokens = warm["eager"][1]
    for r in range(args.repeats):
        for b in (backends if r % 2 == 0 else backends[::-1]):
            s, n, _ = run(b)
            assert n == tokens
            secs[b].append(s)
    rec = {"settings": {"model": args.model, "quantization": args.quantization, "threads": args.threads,
                        "device": args.device, "prompts": len(prompts), "max_new_tokens": p.max_new_tokens,
                        "max_prompt_length": p.max_prompt_length, "repeats": args.repeats},
           "compile_unavailable": why, "same_tokens": same, "tokens_per_call": tokens,
           "warmup_seconds": {b: w[0] for b, w in warm.items()},
           "seconds": secs, "median_seconds": {b: median(v) for b, v in secs.items()},
           "median_tokens_per_s": {b: tokens / median(v) for b, v in secs.items()}}
    print(f"decode, {len(prompts)} prompts x up to {p.max_new_tokens} new tokens ({tokens} kept), "
          f"{args.model} {args.quantization} + LoRA, {args.device}, {args.threads} thread(s), "
          f"{args.repeats} repeats; same tokens: {same}")
    for b in backends:
        print(f"  {b:9s} median {rec['median_seconds'][b]:.3f} s  {rec['median_tokens_per_s'][b]:8.1f} tokens/s  "
              f"(first call {rec['warmup_seconds'][b]:.1f} s)")
    if why is not None:
        print(f"  compiled: not measured, torch.compile cannot build here ({why})")
    elif len(backends) == 2:
        print(f"  compiled / eager speed: {rec['median_tokens_per_s']['compiled'] / rec['median_tokens_per_s']['eager']:.2f}x")
    name = "decode" if args.device == "cpu" else "decode_gpu"
    print(f"wrote {write_result(name, rec, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
