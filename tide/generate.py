"""Sampling from a trained diffusion LM, and its command line.

    python -m tide.generate --checkpoint out/demo/student/checkpoint-120 --prompt "def " --max-new-tokens 64

BD3LM (block diffusion): the answer grows one block at a time, left to right.
For each block, the positions still to be written start as the mask token and
are revealed over `steps` denoising steps: at each step the model runs on the
sequence so far (`[x_t, x_0]` with x_t = x_0 = the sequence: the current block
sees itself and the clean earlier blocks, exactly the training layout) and the
most confident masked positions (greedy, or sampled with `--temperature`) are
written ("low-confidence remasking"). A prompt that ends inside a block keeps
its tokens fixed in that block. MDLM: the same over one block that spans the
whole answer.

This is the simple, correct sampler: every step re-runs the full prefix. A
block KV cache (the clean prefix's keys/values computed once per block) is the
planned speed-up and is not implemented yet.
"""
from __future__ import annotations

import argparse

import torch

from tide.models import load_model


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 64, *, steps: int | None = None,
             temperature: float = 0.0, eos_token_id: int | None = None, generator=None) -> list[int]:
    """Prompt ids -> the new ids (stops at the first block containing `eos_token_id`)."""
    device = model.lm_head_weight.device
    block = model.block_size or (len(prompt_ids) + max_new_tokens)
    weight = model.lm_head_weight
    seq = torch.tensor(prompt_ids, dtype=torch.long, device=device)[None]
    target = len(prompt_ids) + max_new_tokens
    while seq.shape[1] < target:
        end = min(-(-(seq.shape[1] + 1) // block) * block, -(-target // block) * block)
        if model.kind == "mdlm":
            end = target
        start = seq.shape[1]
        seq = torch.cat([seq, seq.new_full((1, end - start), model.mask_token_id)], dim=1)
        todo = end - start
        n_steps = min(steps or todo, todo)
        for k in range(n_steps):
            masked = (seq[0] == model.mask_token_id).nonzero(as_tuple=True)[0]
            masked = masked[masked >= start]
            if masked.numel() == 0:
                break
            hidden = model(seq, seq)[0, masked]                # [m, d]
            logits = hidden.float() @ weight.float().T         # [m, V]: only the open positions
            logits[:, model.mask_token_id] = float("-inf")
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1)
                choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                probs = torch.softmax(logits, dim=-1)
                choice = probs.argmax(-1)
            confidence = probs.gather(1, choice[:, None])[:, 0]
            # reveal an equal share of what is left at each remaining step
            reveal = -(-masked.numel() // (n_steps - k))
            top = confidence.topk(reveal).indices
            seq[0, masked[top]] = choice[top]
        if eos_token_id is not None and (seq[0, start:] == eos_token_id).any():
            break
    out = seq[0, len(prompt_ids):target].tolist()
    if eos_token_id is not None and eos_token_id in out:
        out = out[:out.index(eos_token_id)]
    return out


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m tide.generate",
                                     description="Sample from a tide checkpoint (block diffusion).",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (HF format)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=0, help="denoising steps per block (0 = one per token)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, device=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompt_ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    new_ids = generate(model, prompt_ids, args.max_new_tokens, steps=args.steps or None,
                       temperature=args.temperature, eos_token_id=tokenizer.eos_token_id, generator=generator)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    print(args.prompt + text)
    return text


if __name__ == "__main__":
    main()
