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

Block KV cache (`cache=True`, the default for BD3LM): the keys and values of
the finished, clean blocks are computed once (the x_0 half of training: each
block sees the earlier blocks and itself) and kept in a Hugging Face
`DynamicCache`; a denoising step then runs only the current block, which sees
the cache and itself, and the block's own entries are cropped off again. When
the block is finished it is run once more, clean, to append its keys and
values. Same attention pattern as the full re-run (`cache=False`), which the
tests compare it against; the work per step drops from the whole sequence to
one block.
"""
from __future__ import annotations

import argparse

import torch

from tide.models import load_model


def _reveal(hidden, weight, mask_token_id, temperature, generator):
    """Per open position: the chosen token and its probability (greedy or sampled)."""
    logits = hidden.float() @ weight.float().T         # [m, V]: only the open positions
    logits[:, mask_token_id] = float("-inf")
    if temperature > 0:
        probs = torch.softmax(logits / temperature, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:
        probs = torch.softmax(logits, dim=-1)
        choice = probs.argmax(-1)
    return choice, probs.gather(1, choice[:, None])[:, 0]


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 64, *, steps: int | None = None,
             temperature: float = 0.0, eos_token_id: int | None = None, generator=None,
             cache: bool = True) -> list[int]:
    """Prompt ids -> the new ids (stops at the first block containing `eos_token_id`).

    `steps`: denoising steps per block (default: one per token). `cache`: block KV cache (BD3LM).
    """
    if cache and model.kind == "bd3lm":
        return _generate_cached(model, prompt_ids, max_new_tokens, steps, temperature, eos_token_id, generator)
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
            choice, confidence = _reveal(hidden, weight, model.mask_token_id, temperature, generator)
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


def _generate_cached(model, prompt_ids, max_new_tokens, steps, temperature, eos_token_id, generator):
    from transformers import DynamicCache

    device, weight, block = model.lm_head_weight.device, model.lm_head_weight, model.block_size
    kv = DynamicCache(config=model.config)

    def run(ids: torch.Tensor, start: int) -> torch.Tensor:
        """One block at positions [start, start + len) over the cached clean blocks: every key is
        visible (cache = strictly earlier blocks, plus the block itself), so the mask is all zeros."""
        mask = torch.zeros(1, 1, ids.shape[1], start + ids.shape[1], device=device, dtype=weight.dtype)
        positions = torch.arange(start, start + ids.shape[1], device=device)[None]
        return model.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, cache=kv,
                              use_cache=True).last_hidden_state[0]

    target = len(prompt_ids) + max_new_tokens
    done = len(prompt_ids) // block * block                   # whole clean blocks of the prompt
    for start in range(0, done, block):
        run(torch.tensor([prompt_ids[start:start + block]], device=device), start)
    tail = list(prompt_ids[done:])                             # prompt tokens in the current block
    out = []
    while done < target:
        end = min(done + block, -(-target // block) * block)
        cur = torch.tensor([tail + [model.mask_token_id] * (end - done - len(tail))], device=device)
        todo = int((cur == model.mask_token_id).sum())
        n_steps = min(steps or todo, todo)
        for k in range(n_steps):
            masked = (cur[0] == model.mask_token_id).nonzero(as_tuple=True)[0]
            if masked.numel() == 0:
                break
            hidden = run(cur, done)[masked]
            kv.crop(-cur.shape[1])                             # keep only clean blocks in the cache
            choice, confidence = _reveal(hidden, weight, model.mask_token_id, temperature, generator)
            top = confidence.topk(-(-masked.numel() // (n_steps - k))).indices
            cur[0, masked[top]] = choice[top]
        run(cur, done)                                         # the finished block joins the cache, clean
        out += cur[0, len(tail):].tolist()
        tail, done = [], end
        if eos_token_id is not None and eos_token_id in out:
            break
    out = out[:max_new_tokens]
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
    parser.add_argument("--no-cache", action="store_true", help="re-run the whole sequence at every step")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, device=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    prompt_ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    new_ids = generate(model, prompt_ids, args.max_new_tokens, steps=args.steps or None,
                       temperature=args.temperature, eos_token_id=tokenizer.eos_token_id, generator=generator,
                       cache=not args.no_cache)
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    print(args.prompt + text)
    return text


if __name__ == "__main__":
    main()
