"""The lm-evaluation-harness model `tide`: a tide diffusion LM (BD3LM student or MDLM teacher)
on the standard benchmarks.

    python -m tide.harness --model tide --model_args checkpoint=DIR,samples=16 --tasks hellaswag
    import tide, lm_eval; lm_eval.simple_evaluate(model="tide", model_args={"checkpoint": DIR}, tasks=[...])

`import tide` registers the name `tide` with lm-eval's model registry (a lazy placeholder for
`tide.harness:TideLM`: nothing heavy is imported until it is used). lm-eval 0.4.13 has no
plugin entry points, so the plain `lm_eval` command cannot find models of other packages:
`python -m tide.harness` is that command with `tide` registered (same arguments).

- `loglikelihood(context, continuation)`: the diffusion ELBO (a lower bound on log p) of the
  continuation tokens given the context tokens, `tide.evaluate.sequence_nelbo` with `samples`
  masks; the masks of a request are a function of its tokens and `seed` (not of its place in
  the batch). `is_greedy`: the continuation equals the argmax at every continuation position
  with the whole continuation masked (one denoising step).
- `loglikelihood_rolling(text)`: the ELBO of every token of the text, in windows of `seq_len`
  tokens scored independently.
- `generate_until(context, {until, max_gen_toks, temperature})`: `tide.generate` (block
  sampler), cut at the first stop string.
Tokenization as Hugging Face causal models in lm-eval: trailing spaces of the context move to
the continuation, the pair is encoded whole and split at the context's length.
"""
from __future__ import annotations

import zlib

import torch
from lm_eval.api.model import LM
from tqdm import tqdm

from tide.evaluate import load_checkpoint, sequence_nelbo, trained_seq_len
from tide.generate import generate

__all__ = ["TideLM", "main"]


class TideLM(LM):
    """lm-eval model over a tide checkpoint. `model_args`: checkpoint (required), samples (masks
    per request, default 16), seed, seq_len (default: the training --seq-len), steps (denoising
    steps per block for generation), batch_size, device."""

    def __init__(self, checkpoint: str, samples: int = 16, seed: int = 0, seq_len: int | None = None,
                 steps: int | None = None, batch_size: int | str = 8, device: str = "auto",
                 max_batch_size: int | None = None):
        super().__init__()
        samples, seed, batch_size = _as_int("samples", samples), _as_int("seed", seed, 0), _as_int(
            "batch_size", 8 if str(batch_size).startswith("auto") else batch_size)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else device
        self.model, self.tokenizer = load_checkpoint(checkpoint, device=device)
        self._device = torch.device(device)
        self.checkpoint, self.samples, self.seed, self.batch_size = str(checkpoint), samples, seed, batch_size
        self.steps = None if steps in (None, "None", 0, "0") else _as_int("steps", steps)
        block = self.model.block_size or 1
        default_len = trained_seq_len(checkpoint) or self.model.config.max_position_embeddings
        self.seq_len = _as_int("seq_len", seq_len) if seq_len not in (None, "None") else default_len // block * block
        if self.seq_len % block:
            raise ValueError(f"seq_len must be a multiple of the block size {block}, got {self.seq_len}")

    @property
    def tokenizer_name(self) -> str:
        return self.checkpoint

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template is not False else None

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ scoring
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, head = self._encode(context + continuation), self._encode(context)
        return whole[:len(head)], whole[len(head):]

    def _seed(self, ids: list[int]) -> int:
        return self.seed * 1_000_003 + zlib.crc32(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())

    def _nelbo(self, sequences, disable_tqdm: bool) -> torch.Tensor:
        """Mean negative ELBO (nats) per `(ids, number of scored tokens at the end)`."""
        pairs = []
        for ids, scored in sequences:
            maskable = torch.zeros(len(ids), dtype=torch.bool)
            maskable[len(ids) - scored:] = True
            pairs.append((torch.tensor(ids, dtype=torch.long), maskable))
        seeds = [self._seed(ids) for ids, _ in sequences]
        per_sample = sequence_nelbo(self.model, pairs, samples=self.samples, seeds=seeds, batch_size=self.batch_size,
                                    pad_id=self.tokenizer.pad_token_id, progress=not disable_tqdm)
        return per_sample.mean(dim=1)

    @torch.no_grad()
    def _is_greedy(self, ids: list[int], scored: int) -> bool:
        """Every continuation token is the argmax at its position with the whole continuation masked."""
        model, block = self.model, self.model.block_size
        length = -(-len(ids) // block) * block if block else len(ids)
        x_0 = torch.full((1, length), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        x_0[0, :len(ids)] = torch.tensor(ids)
        attention = None
        if length > len(ids):
            attention = (torch.arange(length) < len(ids)).long()[None].to(self._device)
        x_0 = x_0.to(self._device)
        x_t = x_0.clone()
        x_t[0, len(ids) - scored:len(ids)] = model.mask_token_id
        hidden = model(x_t, x_0, attention)[0, len(ids) - scored:len(ids)]           # [n, d]
        logits = hidden.float() @ model.lm_head_weight.float().T                     # [n, V]: continuation rows only
        return bool((logits.argmax(-1) == x_0[0, len(ids) - scored:len(ids)]).all())

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        sequences = []
        for request in requests:
            context, continuation = request.args
            head, tail = self._pair(context, continuation) if context else ([], self._encode(continuation))
            if not tail:
                raise ValueError(f"continuation {continuation!r} has no tokens")
            if len(tail) > self.seq_len:
                raise ValueError(f"continuation of {len(tail)} tokens is longer than seq_len={self.seq_len}")
            sequences.append(((head + tail)[-self.seq_len:], len(tail)))
        nelbo = self._nelbo(sequences, disable_tqdm)
        out = []
        for (ids, scored), value, request in zip(sequences, nelbo.tolist(), requests):
            result = (-value, self._is_greedy(ids, scored))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        sequences, owners = [], []
        for index, request in enumerate(requests):
            ids = self._encode(request.args[0])
            for start in range(0, len(ids), self.seq_len):
                window = ids[start:start + self.seq_len]
                sequences.append((window, len(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        if sequences:
            for owner, value in zip(owners, self._nelbo(sequences, disable_tqdm).tolist()):
                totals[owner] -= value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same length and temperature go to `tide.generate` together,
        batch_size at a time (its output does not depend on the batch)."""
        jobs = []  # (index, prompt ids, max new tokens, temperature, stop strings)
        for index, request in enumerate(requests):
            context, options = request.args
            options = dict(options or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _as_int("max_gen_toks", options.pop("max_gen_toks", 256))
            temperature = float(options.pop("temperature", 0.0) or 0.0)
            if not options.pop("do_sample", temperature > 0):
                temperature = 0.0
            if max_new >= self.seq_len:
                raise ValueError(f"max_gen_toks={max_new} must be smaller than seq_len={self.seq_len}")
            jobs.append((index, self._encode(context)[-(self.seq_len - max_new):], max_new, temperature, until))
        out = [""] * len(requests)
        bar = tqdm(total=len(jobs), disable=disable_tqdm, desc="generate (tide)")
        groups = {}
        for job in jobs:
            groups.setdefault((job[2], job[3]), []).append(job)
        for (max_new, temperature), group in groups.items():
            for first in range(0, len(group), self.batch_size):
                chunk = group[first:first + self.batch_size]
                new_ids = generate(self.model, [job[1] for job in chunk], max_new, steps=self.steps,
                                   temperature=temperature, eos_token_id=self.tokenizer.eos_token_id,
                                   seed=[self.seed + job[0] for job in chunk])
                for (index, _, _, _, until), ids in zip(chunk, new_ids):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                    out[index] = text
                bar.update(len(chunk))
        bar.close()
        return out

def _as_int(name: str, value, low: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}") from None
    if number < low or str(number) != str(value).strip():
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return number


def main() -> None:
    """`lm_eval`'s command line, with the model `tide` registered (by `import tide`)."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
