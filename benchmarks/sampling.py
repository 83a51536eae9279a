"""Sampling speed of `tide.generate`: block KV cache vs none, threshold (parallel) decoding vs one
token per step, batch 1 and 8, and the per-call overhead on a small trained student.

    python -m benchmarks.sampling [--device cpu|cuda] [--checkpoint out/demo/distilled/checkpoint-150]
                                  [--new-tokens 256] [--steps 8] [--threshold 0.9] [--quick]

1. A random BD3LM big enough for attention to matter: Qwen3-shaped, hidden 512, 8 layers,
   block 32, vocabulary 8192, about 25M parameters, float32 on CPU (on CUDA: a 0.6B-shaped
   Qwen3 in bf16). Embeddings (tied LM head) at std 2 / sqrt(d): logits with std about 2.
   Prompts: random ids, 8 mixed lengths (batch 1: the first). Rows:
   - cache vs no cache at `--steps` steps per block (the same tokens; the tokens/s ratio);
   - one token per step vs `--threshold` decoding, with the cache: model calls, the fraction
     saved, and the exact-match rate of the threshold output against the one-per-step output.
   Batch 1 is also checked against row 0 of batch 8 (batch invariance, same tokens).
2. `--checkpoint`: a trained student (the demo's), its tokenizer, 8 code prompts: the same
   threshold vs one-per-step rows (a trained model is confident, a random one is not), the time
   of 256 tokens at batch 1, and the per-call overhead: ms per model call inside `generate` vs
   a bare forward of the decoder on the same current-block shape.

Timings: the median of `--repeats` runs after a one-block warm-up, `torch.set_num_threads(--threads)`;
on CPU the CPU seconds of this process (`time.process_time`: on a shared, oversubscribed machine the wall
clock also counts waiting for a core; both are in the JSON), on CUDA the synchronised wall clock. Results: benchmarks/results/sampling_<device>.{json,md} (`--name`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import statistics
import time

import torch

from benchmarks.timing import sync
from tide.generate import generate
from tide.models import build_config, build_model, load_model

CODE_PROMPTS = ["def ", "import os\n", "class ", "    return ", "for i in range(", "if __name__ == ",
                "# ", "        self."]
PROMPT_LENGTHS = [24, 40, 17, 64, 33, 9, 50, 29]  # random-model prompts: mixed, not multiples of 32


def random_model(device, quick: bool):
    """The random BD3LM of part 1 (see the module docstring)."""
    torch.manual_seed(0)
    if quick:
        config, block = build_config("qwen3", 512, 64, 2, 4), 16
    elif device.type == "cuda":  # Qwen3-0.6B's shape
        config = build_config("qwen3", 151936, 1024, 28, 16, intermediate_size=3072)
        config.num_key_value_heads, block = 8, 32
    else:
        config, block = build_config("qwen3", 8192, 512, 8, 8, intermediate_size=1024), 32
    model = build_model("bd3lm", config, block_size=block, mask_token_id=config.vocab_size - 1, device=device,
                        attn_implementation="sdpa")
    torch.nn.init.normal_(model.decoder.get_input_embeddings().weight, std=2 / config.hidden_size ** 0.5)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    return model.eval()


class CallCounter:
    """Counts forward calls of the decoder (the model calls a sampler makes)."""

    def __init__(self, model):
        self.calls = 0
        model.backbone.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self.calls += 1


def timed(fn, device, repeats: int, warmup=None):
    """(result of the last run, median wall seconds, median CPU seconds of this process) after one run
    of `warmup` (default: `fn`). On a shared, oversubscribed CPU the process's CPU time is the steadier
    measure of the work (wall time also counts the waits for a core); on CUDA read the wall time."""
    result = (warmup or fn)()
    walls, cpus = [], []
    for _ in range(repeats):
        sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        sync(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return result, statistics.median(walls), statistics.median(cpus)


def measure(model, prompts, counter, device, repeats, **options):
    new_tokens = options["max_new_tokens"]
    generate(model, prompts, **{**options, "max_new_tokens": min(new_tokens, model.block_size)})  # warm-up
    before = counter.calls
    out, wall, cpu = timed(lambda: generate(model, prompts, **options), device, repeats, warmup=lambda: None)
    calls = (counter.calls - before) // repeats                    # model calls of one run (deterministic)
    tokens = sum(len(o) for o in out)
    assert tokens == len(prompts) * new_tokens, "no EOS here: every row writes max_new_tokens"
    seconds = cpu if device.type == "cpu" else wall
    return out, {"batch": len(prompts), "seconds": seconds, "wall_seconds": wall, "cpu_seconds": cpu,
                 "tokens_per_s": tokens / seconds, "calls": calls, "ms_per_call": 1e3 * seconds / calls}


def match(out, reference) -> dict:
    same = sum(a == b for o, r in zip(out, reference) for a, b in zip(o, r))
    return {"token_match": same / sum(map(len, reference)),
            "rows_equal": sum(o == r for o, r in zip(out, reference)) / len(reference)}


def decoding_rows(model, prompts_by_batch, counter, device, args, label):
    """One token per step vs threshold decoding (cache on), per batch size."""
    rows = []
    for prompts in prompts_by_batch:
        common = {"max_new_tokens": args.new_tokens, "block_size": None}
        base, base_row = measure(model, prompts, counter, device, args.repeats, **common)
        rows.append({"model": label, "decoding": "one token per step", **base_row})
        for threshold in args.threshold:
            out, row = measure(model, prompts, counter, device, args.repeats, strategy="threshold",
                               threshold=threshold, **common)
            rows.append({"model": label, "decoding": f"threshold {threshold}", **row,
                         "calls_saved": 1 - row["calls"] / base_row["calls"], **match(out, base)})
    return rows


def overhead_row(model, prompts, counter, device, args, label) -> dict:
    """ms per model call inside generate vs a bare decoder forward of the current-block shape."""
    block = model.block_size
    ids = torch.randint(0, model.mask_token_id, (len(prompts), block), device=device)
    positions = torch.arange(block, device=device)[None]
    with torch.no_grad():
        _, wall, cpu = timed(lambda: model.backbone(input_ids=ids, position_ids=positions, use_cache=False), device,
                             max(20, args.repeats))
    bare = cpu if device.type == "cpu" else wall
    _, row = measure(model, prompts, counter, device, args.repeats, max_new_tokens=args.new_tokens)
    return {"model": label, "batch": len(prompts), "generate_ms_per_call": row["ms_per_call"],
            "bare_forward_ms": 1e3 * bare, "seconds_for_new_tokens": row["seconds"], "calls": row["calls"]}


def markdown(report) -> str:
    env = report["environment"]
    lines = [f"`{report['command']}` ({env['date']}, {env['machine']}, {env['cpus']} cores, torch {env['torch']}, "
             f"{env['threads']} thread(s), load average {env['load_before']} before / {env['load_after']} after; "
             + ("times are this process's CPU seconds, steadier than the wall clock on a shared machine"
                if env["device"] == "cpu" else "wall-clock times") + ")", ""]
    cache = report["cache"]
    if cache:
        lines += [f"**Block KV cache vs none** ({cache[0]['model']}, {report['new_tokens']} new tokens, "
                  f"{report['steps']} steps per block, greedy)", "",
                  "| batch | cache | tokens/s | model calls | ms per call | cache speed-up | same tokens |",
                  "|---|---|---|---|---|---|---|"]
        for row in cache:
            lines.append(f"| {row['batch']} | {row['cache']} | {row['tokens_per_s']:.1f} | {row['calls']} | "
                         f"{row['ms_per_call']:.1f} | {row.get('speedup', '')}{'x' if 'speedup' in row else ''} | "
                         f"{row.get('same_tokens', '')} |")
        lines.append("")
    for title, rows in (("random model", report["decoding_random"]), ("trained student", report["decoding_student"])):
        if not rows:
            continue
        lines += [f"**Threshold decoding vs one token per step** ({rows[0]['model']}, {report['new_tokens']} "
                  "new tokens, greedy, cache on)", "",
                  "| batch | decoding | tokens/s | model calls | calls saved | token match | rows equal |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows:
            saved = f"{100 * row['calls_saved']:.0f}%" if "calls_saved" in row else ""
            tm = f"{100 * row['token_match']:.1f}%" if "token_match" in row else ""
            eq = f"{100 * row['rows_equal']:.0f}%" if "rows_equal" in row else ""
            lines.append(f"| {row['batch']} | {row['decoding']} | {row['tokens_per_s']:.1f} | {row['calls']} | "
                         f"{saved} | {tm} | {eq} |")
        lines.append("")
    if report["overhead"]:
        lines += [f"**Per-call overhead** ({report['overhead'][0]['model']}, {report['new_tokens']} new tokens, "
                  "one token per step)", "",
                  "| batch | seconds | model calls | ms per call in generate | bare decoder forward (ms) |",
                  "|---|---|---|---|---|"]
        for row in report["overhead"]:
            lines.append(f"| {row['batch']} | {row['seconds_for_new_tokens']:.2f} | {row['calls']} | "
                         f"{row['generate_ms_per_call']:.2f} | {row['bare_forward_ms']:.2f} |")
        lines.append("")
    if report.get("batch_invariant") is not None:
        lines.append(f"Batch 1 equals row 0 of the ragged batch of 8 (same tokens): {report['batch_invariant']}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--checkpoint", default=None, help="a trained tide BD3LM (part 2), e.g. the demo's student")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="steps per block for the cache vs no-cache rows")
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.9])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-random", action="store_true", help="only part 2 (--checkpoint)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model and 32 tokens (a smoke test)")
    parser.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for the JSON and markdown")
    parser.add_argument("--name", default="sampling_{device}", help="file name (no suffix) of the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens = min(args.new_tokens, 32)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report = {"command": "python -m benchmarks.sampling " + " ".join(argv if argv is not None else sys.argv[1:]),
              "new_tokens": args.new_tokens, "steps": args.steps, "cache": [], "decoding_random": [],
              "decoding_student": [], "overhead": [], "batch_invariant": None}

    if not args.skip_random:
        model = random_model(device, args.quick)
        counter = CallCounter(model)
        label = (f"random BD3LM, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, hidden "
                 f"{model.config.hidden_size}, {model.config.num_hidden_layers} layers, block {model.block_size}, "
                 f"{next(model.parameters()).dtype}".replace("torch.", ""))
        generator = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, model.mask_token_id, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
        by_batch = [prompts[:b] for b in args.batch_sizes]
        outputs = {}
        for batch in by_batch:
            rows = []
            for cache in (True, False):
                out, row = measure(model, batch, counter, device, args.repeats, max_new_tokens=args.new_tokens,
                                   steps=args.steps, cache=cache)
                outputs[len(batch), cache] = out
                rows.append({"model": label, "cache": "on" if cache else "off", **row})
            rows[0]["speedup"] = round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 2)
            rows[0]["same_tokens"] = outputs[len(batch), True] == outputs[len(batch), False]
            report["cache"] += rows
            print(json.dumps(rows), flush=True)
        if 1 in args.batch_sizes and 8 in args.batch_sizes:
            report["batch_invariant"] = outputs[1, True][0] == outputs[8, True][0]
        report["decoding_random"] = decoding_rows(model, by_batch, counter, device, args, label)
        print(json.dumps(report["decoding_random"]), flush=True)

    if args.checkpoint:
        from transformers import AutoTokenizer
        model = load_model(args.checkpoint, device=device, attn_implementation="sdpa").eval()
        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
        counter = CallCounter(model)
        label = (f"trained student {args.checkpoint}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                 f"parameters, block {model.block_size}")
        prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in CODE_PROMPTS]
        by_batch = [prompts[:b] for b in args.batch_sizes]
        report["decoding_student"] = decoding_rows(model, by_batch, counter, device, args, label)
        print(json.dumps(report["decoding_student"]), flush=True)
        report["overhead"] = [overhead_row(model, batch, counter, device, args, label) for batch in by_batch]
        print(json.dumps(report["overhead"]), flush=True)

    report["environment"] = {"date": datetime.date.today().isoformat(), "machine": platform.machine(),
                             "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                             "device": str(device), "load_before": load_before,
                             "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    text = markdown(report)
    print(text)
    if not args.quick:
        os.makedirs(args.out, exist_ok=True)
        name = os.path.join(args.out, args.name.format(device=device.type))
        with open(name + ".json", "w") as fh:
            json.dump(report, fh, indent=1)
        with open(name + ".md", "w") as fh:
            fh.write(text)
    return report


if __name__ == "__main__":
    main()
