"""The TIDE distillation trainer: a BD3LM student learns from a frozen diffusion teacher.

    python -m tide.train                                   # built-in CPU demo (tide.demo), no download
    python -m tide.train --config configs/shared_tidal.yaml --max-steps 500
    torchrun --nproc-per-node 8 -m tide.train --config ... --parallel fsdp

One step (SPEC.md): draw t per sequence, mask the maskable tokens with
probability t (whole chunks in the cross-tokenizer pipeline), run the student
on [x_t, x_0] to final hidden states, run the teacher (twice with CompDemo,
merged on hidden states) under no_grad, gather the masked rows, and call the
fused loss on (hidden, LM-head weight) pairs: no [batch, length, V] logits are
ever materialised. Checkpoints (tide/checkpoint.py) are Hugging Face directories
plus trainer state in JSON and safetensors, with checksums; `--resume` continues
from the newest valid one, bit-exactly on CPU, with the same options.

Normalisation: CE is token-normalised (divided by the maskable tokens) within each
micro-batch; gradient accumulation and DDP/FSDP average the micro-batch losses.
Data order and masks are functions of (seed, global micro-batch index), so N
processes x 1 micro-batch and 1 process x N accumulated micro-batches see the
same batches and masks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from tide import checkpoint, evaluate, losses, schedules
from tide.compdemo import merge_teacher_hidden, teacher_inputs
from tide.config import CHUNK_METHODS, TIDAL_METHODS, Config, check, load_config
from tide.generate import generate
from tide.models import build_config, build_model, load_model, read_config
from tide.tracking import Tracker

MASK_TOKEN = "<|mask|>"


# --------------------------------------------------------------------------- masking
def seeded_generator(seed: int, micro_index: int, device) -> torch.Generator:
    """All randomness of one micro-batch comes from (seed, its global index): resumes
    and any world size see the same masks for the same data."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + micro_index)
    return gen


def noise_batch(batch: dict, cfg: Config, gen: torch.Generator) -> dict:
    """t per sequence, its mask ratio 1 - alpha(t), masked positions, and (cross pipeline)
    chunk-consistent masks."""
    ids, maskable = batch["student_input_ids"], batch["student_maskable"]
    t = cfg.eps + (1 - cfg.eps) * torch.rand(ids.shape[0], device=ids.device, generator=gen)
    ratio = schedules.mask_ratio(t, cfg.alpha_schedule)
    masked = maskable & (torch.rand(ids.shape, device=ids.device, generator=gen) < ratio[:, None])
    out = {"t": t, "mask_ratio": ratio, "masked": masked}
    if cfg.pipeline == "cross":
        # chunk-consistent masking: one masked student token masks its whole chunk, on both sides
        # (tide.data gives every chunk a batch-unique id and only maskable tokens)
        s_chunk, t_chunk = batch["student_chunk_ids"], batch["teacher_chunk_ids"]
        hit = torch.zeros(batch["num_chunks"] + 1, dtype=torch.bool, device=ids.device)
        hit[s_chunk[masked & (s_chunk >= 0)]] = True           # slot num_chunks absorbs the -1s
        masked = masked | hit[torch.where(s_chunk >= 0, s_chunk, batch["num_chunks"])]
        out.update(masked=masked, teacher_masked=hit[torch.where(t_chunk >= 0, t_chunk, batch["num_chunks"])])
    elif cfg.pipeline == "aligned":
        # carry the student's masks to the teacher at aligned (text-matched) positions
        rows, s_pos, t_pos = batch["aligned_pairs"].unbind(1)  # [P] each
        keep = masked[rows, s_pos]
        teacher_masked = torch.zeros_like(batch["teacher_input_ids"], dtype=torch.bool)
        teacher_masked[rows[keep], t_pos[keep]] = True
        out.update(teacher_masked=teacher_masked, pair_rows=rows[keep], pair_student=s_pos[keep],
                   pair_teacher=t_pos[keep])
    else:
        out["teacher_masked"] = masked
    return out


@torch.no_grad()
def teacher_hidden(teacher, batch: dict, noise: dict, cfg: Config, gen) -> torch.Tensor:
    """Teacher final hidden states `[b, l_t, d_t]`: one pass on x_t, or CompDemo's two merged."""
    ids, masked, attention = batch["teacher_input_ids"], noise["teacher_masked"], batch.get("teacher_attention_mask")
    if not cfg.compdemo:
        x_t = torch.where(masked, teacher.mask_token_id, ids)
        return teacher(x_t, ids, attention)
    chunks = batch.get("teacher_chunk_ids") if cfg.pipeline == "cross" else None  # chunk-level split
    demo = teacher_inputs(ids, masked, teacher.mask_token_id, cfg.demo_ratio, chunk_ids=chunks, generator=gen)
    hidden_1 = teacher(demo.pass1_ids, ids, attention)
    hidden_2 = teacher(demo.pass2_ids, ids, attention)
    return merge_teacher_hidden(hidden_1, hidden_2, demo.mask_a)


# --------------------------------------------------------------------------- student + loss
class StudentLoss(nn.Module):
    """The student and its loss in one forward, so DDP and FSDP2 wrap exactly this:
    under `fully_shard` the LM head is gathered for the duration of this forward."""

    def __init__(self, student, cfg: Config, teacher_vocab: int | None):
        super().__init__()
        self.student, self.cfg = student, cfg
        vocab = student.vocab_size
        self.shared_vocab = None if teacher_vocab in (None, vocab) else min(vocab, teacher_vocab)

    def forward(self, batch: dict, noise: dict, t_hidden, t_weight, progress: float):
        cfg, student = self.cfg, self.student
        ids, masked = batch["student_input_ids"], noise["masked"]
        x_t = torch.where(masked, student.mask_token_id, ids)
        hidden = student(x_t, ids, batch.get("student_attention_mask"))  # [b, L, d], x_t half
        weight = student.lm_head_weight
        rows_b = masked.nonzero(as_tuple=True)[0]
        row_ratio = noise["mask_ratio"][rows_b]  # TIDAL's t_b: the mask ratio of the row's sequence
        ce_row = ce_row_weights(batch, noise, cfg)[masked]  # [N]: CE = sum over masked rows of ce_row * CE_row
        n_rows = rows_b.numel()
        h_rows, targets = hidden[masked], ids[masked]
        common = dict(temperature=cfg.temperature, impl=cfg.impl)

        if cfg.method != "ce" and cfg.pipeline == "shared":  # token-level, CE in the same vocabulary pass
            # The fused losses divide both terms by the row count N ("mean"): ce_weight = N * ce_row undoes
            # it. The --ce-weight / --distill-weight ratio rides in ce_weight too, so both outputs get the
            # same upstream gradient: the chunked path then contracts one logit gradient for both.
            ratio = cfg.ce_weight / cfg.distill_weight if cfg.ce_weight and cfg.distill_weight else 1.0
            fused = dict(targets=targets, ce_weight=ce_row * n_rows * ratio, shared_vocab=self.shared_vocab,
                         **common)
            t_rows = t_hidden[masked]
            if cfg.method == "tidal":
                distill, ce = losses.tidal_loss(h_rows, weight, t_rows, t_weight, row_ratio, progress,
                                                **self.tidal_options, **fused)
            else:
                distill, ce = losses.kl_loss(h_rows, weight, t_rows, t_weight, reverse=cfg.method == "reverse_kl",
                                             **fused)
            ce = ce / ratio
        elif cfg.method == "ce":  # CE alone: a scalar of known row weights (chunked: gradients in its forward)
            ce = losses.cross_entropy(h_rows, weight, targets, ce_weight=ce_row, reduction="sum", impl=cfg.impl)
            distill = torch.zeros_like(ce)
        else:  # CE next to a loss on other rows (aligned pairs, chunks)
            logp = losses.token_logprobs(h_rows, weight, targets, impl=cfg.impl)  # [N], also CALM's input
            ce = -(ce_row * logp).sum()
            if cfg.pipeline == "aligned":
                distill = self.pair_loss(hidden, weight, t_hidden, t_weight, noise, progress, common)
            else:
                distill = self.chunk_loss(logp, t_hidden, t_weight, batch, noise, progress)
        loss = cfg.ce_weight * ce + cfg.distill_weight * distill
        return loss, {"loss": loss.detach(), "ce": ce.detach(), "distill": distill.detach()}

    @property
    def tidal_options(self):
        cfg = self.cfg
        return dict(lambda_init=cfg.lambda_init, lambda_max=cfg.lambda_max, schedule=cfg.lambda_schedule,
                    axis=cfg.lambda_axis, timestep_weight=cfg.timestep_weight)

    def pair_loss(self, hidden, weight, t_hidden, t_weight, noise, progress, common):
        """Aligned mode: token-level losses at aligned masked positions only."""
        rows, s_pos, t_pos = noise["pair_rows"], noise["pair_student"], noise["pair_teacher"]
        s_h, t_h = hidden[rows, s_pos], t_hidden[rows, t_pos]
        if self.cfg.method == "tidal":
            return losses.tidal_loss(s_h, weight, t_h, t_weight, noise["mask_ratio"][rows], progress,
                                     shared_vocab=self.shared_vocab, **self.tidal_options, **common).distill
        return losses.kl_loss(s_h, weight, t_h, t_weight, reverse=self.cfg.method == "reverse_kl",
                              shared_vocab=self.shared_vocab, **common).distill

    def chunk_loss(self, logp, t_hidden, t_weight, batch, noise, progress):
        """Cross-tokenizer pipeline: (Reverse) CALM / (Reverse) CALM+TIDAL on chunk log-likelihoods,
        at --calm-temperature. logp `[N]`: the student's token log-probabilities at the masked
        positions (the CE term's, so one pass over the vocabulary serves both)."""
        cfg = self.cfg
        s_chunk, t_chunk, num_chunks = batch["student_chunk_ids"], batch["teacher_chunk_ids"], batch["num_chunks"]
        s_chunk = s_chunk[noise["masked"]]                                  # [N], -1: in no chunk
        in_chunk = s_chunk >= 0
        t_rows = noise["teacher_masked"]
        with torch.no_grad():
            t_logp = losses.token_logprobs(t_hidden[t_rows], t_weight, batch["teacher_input_ids"][t_rows],
                                           impl=cfg.impl)
        lam = weight_c = None
        if cfg.method in TIDAL_METHODS:  # per-chunk lambda_b and w_b from the mask ratio of the chunk's sequence
            t_c = noise["mask_ratio"][batch["chunk_batch_index"]]
            lam = schedules.row_lambda(t_c, progress, cfg.lambda_init, cfg.lambda_max, cfg.lambda_schedule,
                                       cfg.lambda_axis)
            weight_c = schedules.timestep_weight(t_c, cfg.timestep_weight)
        return losses.calm_from_logprobs(
            logp[in_chunk], s_chunk[in_chunk], t_logp, t_chunk[t_rows],
            num_chunks=num_chunks, reverse=cfg.method in ("reverse_calm", "reverse_calm_tidal"), lam=lam,
            weight=weight_c, temperature=cfg.calm_temperature, impl=cfg.impl)


def ce_row_weights(batch: dict, noise: dict, cfg: Config) -> torch.Tensor:
    """Per-position CE weights `[b, L]` such that CE = sum over masked positions of weight * CE_i.

    Schedule weight of each sequence (--ce-schedule-weight: the ELBO weight -alpha'(t) / (1 - alpha(t)),
    1/t for the linear schedule, or 1) over the --ce-normalization denominator, b being the number
    of sequences in the micro-batch: "token": the maskable tokens of the micro-batch; "sequence":
    each sequence's own maskable tokens (at least 1) times b; "batch": b. These are the official
    loss_norm_type definitions (PKU-YuanGroup/TIDE dllm/core/trainers/bd3lm.py@da47bac).
    """
    t, maskable = noise["t"], batch["student_maskable"]
    seq_weight = torch.ones_like(t) if cfg.ce_schedule_weight == "uniform" \
        else schedules.elbo_weight(t, cfg.alpha_schedule)  # "elbo" (or its old name "linear")
    per_seq, b = maskable.sum(1), maskable.shape[0]                               # [b], b
    if cfg.ce_normalization == "token":
        seq_weight = seq_weight / per_seq.sum().clamp(min=1)
    elif cfg.ce_normalization == "sequence":
        seq_weight = seq_weight / (per_seq.clamp(min=1) * b)
    else:
        seq_weight = seq_weight / b
    return seq_weight[:, None].expand_as(maskable)


# --------------------------------------------------------------------------- schedule
def learning_rate(step: int, cfg: Config) -> float:
    """Linear warmup, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (cfg.lr - cfg.min_lr)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(argv)
    check(cfg)

    # ---- processes and devices
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    master = rank == 0
    fsdp = distributed and cfg.parallel == "fsdp"
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    use_bf16 = device.type == "cuda" and cfg.dtype == "bf16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # ---- resume point: the newest checkpoint that verifies, written with the same options
    resume_from = resume_state = None
    if cfg.resume:
        resume_from, resume_state = checkpoint.latest_valid(cfg.output_dir, rank)
        changed = checkpoint.config_differences(resume_state["config"], cfg)
        if changed and not cfg.allow_config_change:
            raise SystemExit(f"--resume: {resume_from} was written with other options:\n  " + "\n  ".join(changed)
                             + "\nresume with the same options, or pass --allow-config-change to continue anyway")
        position = resume_state["data_position"]
        if (position["batch_size"], position["world_size"]) != (cfg.batch_size, world):
            raise SystemExit(f"--resume: {resume_from} was written with --batch-size {position['batch_size']} on "
                             f"{position['world_size']} process(es); resume with the same geometry "
                             f"(now {cfg.batch_size} on {world}) to continue the same data order")
    elif cfg.overwrite and master:
        checkpoint.remove_run(cfg.output_dir)

    # ---- tokenizers, then the data (checked before any model is built)
    tokenizers = load_tokenizers(cfg)
    dataset, collate = build_data(cfg, tokenizers)
    if len(dataset) < cfg.batch_size * world:
        raise SystemExit(f"--data gives {len(dataset)} examples, fewer than one global batch "
                         f"({cfg.batch_size} x {world}): add data or lower --batch-size")
    held_out = evaluate.load_records(cfg.eval_data) if cfg.eval_data else None  # --eval-data: bits per byte

    # ---- models
    teacher = load_teacher(cfg, tokenizers["teacher"], device, use_bf16, fsdp) if cfg.needs_teacher else None
    student = make_student(cfg, tokenizers["student"], resume_from, device)
    # config.json names the tokens a sampler stops at and pads with (tide.generate reads them)
    student.config.eos_token_id = tokenizers["student"].eos_token_id
    student.config.pad_token_id = tokenizers["student"].pad_token_id
    if cfg.gradient_checkpointing:  # transformers 5 renamed it activation checkpointing
        if hasattr(student.decoder, "activation_checkpointing_enable"):
            student.decoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.decoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    check_pair(cfg, student, teacher, tokenizers)

    # ---- data order: the dataset in a fixed order per epoch; position = micro-batches consumed
    def micro_batch(index: int) -> dict:
        """Global micro-batch `index`; this rank takes its slice of it."""
        per_epoch = len(dataset) // (cfg.batch_size * world)
        epoch, position = divmod(index, per_epoch)
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        start = (position * world + rank) * cfg.batch_size
        batch = collate([dataset[int(i)] for i in order[start:start + cfg.batch_size]])
        return to_device(fixed_length(batch, cfg, collate), device)

    # ---- wrap for DDP / FSDP2; the optimizer
    objective = StudentLoss(student, cfg, teacher.vocab_size if teacher is not None else None)
    wrapped = objective
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)
        for layer in student.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(objective, mp_policy=policy)
        if teacher is not None:
            shard_frozen(teacher, device)
    elif distributed:
        wrapped = nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    decay = [p for p in student.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
    step = 0
    if resume_from:
        step = resume_state["step"]
        optimizer_state = checkpoint.load_optimizer_state(resume_from, resume_state)
        if fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(wrapped, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(optimizer_state)
        checkpoint.set_rng(os.path.join(resume_from, f"rng_rank{rank}.safetensors"))
        if master:
            print(f"resumed from {resume_from} at step {step}")

    if master:
        print_summary(cfg, student, teacher, dataset, world, device, resume_from, step)

    # ---- the loop
    os.makedirs(cfg.output_dir, exist_ok=True)
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if master and resume_from and os.path.exists(metrics_path):  # drop lines logged after the checkpoint
        kept = []
        with open(metrics_path, encoding="utf-8", errors="replace") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    record_step = json.loads(line)["step"]
                except (ValueError, TypeError, KeyError):  # blank, or torn by a kill in the middle of a write
                    warnings.warn(f"{metrics_path} line {number} is not a metrics record: dropped")
                    continue
                if record_step <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        with open(metrics_path, "w") as fh:
            fh.writelines(kept)
    metrics = open(metrics_path, "a" if resume_from else "w") if master else None
    bar = tracker = None
    if master and cfg.progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=step, desc=f"tide {cfg.method}", dynamic_ncols=True)
    if master and cfg.report_to != "none":
        tracker = Tracker(cfg.report_to, cfg.output_dir, os.path.basename(os.path.abspath(cfg.output_dir)),
                          dataclasses.asdict(cfg))
    history, eval_history, last_saved, postfix = [], [], None, {}
    start_time = last_time = time.time()
    real_tokens = 0  # non-padding student tokens of this process since the last log line
    wrapped.train()
    while step < cfg.max_steps:
        lr = learning_rate(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        progress = step / cfg.max_steps
        parts_sum = None
        for micro in range(cfg.grad_accum):
            index = step * cfg.grad_accum + micro          # global micro-batch index (data + masks)
            batch = micro_batch(index)
            mask = batch.get("student_attention_mask")  # absent when the batch has no padding
            real_tokens = real_tokens + (mask.sum() if mask is not None else batch["student_input_ids"].numel())
            gen = seeded_generator(cfg.seed, index * world + rank, device)
            noise = noise_batch(batch, cfg, gen)
            t_hidden = t_weight = None
            with autocast:
                if teacher is not None:  # (shared pipeline: tide.data's teacher fields copy the student's)
                    t_hidden = teacher_hidden(teacher, batch, noise, cfg, gen)
                    t_weight = teacher.lm_head_weight
                last = micro == cfg.grad_accum - 1  # sync gradients only on the last micro-step
                if fsdp:
                    wrapped.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext() if last or not distributed or fsdp else wrapped.no_sync()
                with sync:
                    loss, parts = wrapped(batch, noise, t_hidden, t_weight, progress)
                    (loss / cfg.grad_accum).backward()
            parts_sum = parts if parts_sum is None else {k: parts_sum[k] + v for k, v in parts.items()}
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % cfg.log_interval == 0 or step == cfg.max_steps or step == 1:
            parts = torch.stack([parts_sum[k] for k in ("loss", "ce", "distill")]) / cfg.grad_accum
            tokens = torch.as_tensor(real_tokens, dtype=torch.float64, device=parts.device)
            if distributed:
                dist.all_reduce(parts)
                parts /= world
                dist.all_reduce(tokens)  # tokens/s of all processes together
            now = time.time()
            record = {"step": step, "time": round(now, 3), "elapsed_s": round(now - start_time, 3),
                      "loss": parts[0].item(), "ce": parts[1].item(), "distill": parts[2].item(),
                      "lr": lr, "lambda": schedules.lambda_train(progress, cfg.lambda_init, cfg.lambda_max,
                                                                  cfg.lambda_schedule) if cfg.method in TIDAL_METHODS else None,
                      "grad_norm": float(getattr(grad_norm, "full_tensor", lambda: grad_norm)())
                      if grad_norm is not None else None,
                      "tokens": int(tokens.item()),  # real (non-padding) student tokens since the last line
                      "tokens_per_s": tokens.item() / max(now - last_time, 1e-9)}
            last_time, real_tokens = now, 0
            history.append(record)
            if master:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if tracker is not None:
                    tracker.log(record, step)
                postfix.update(progress_fields(record))
        saving = step % cfg.save_interval == 0 or step == cfg.max_steps
        if held_out is not None and (step % (cfg.eval_interval or cfg.save_interval) == 0 or step == cfg.max_steps):
            record = held_out_record(student, held_out, tokenizers["student"], cfg, step)
            eval_history.append(record)
            if master:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if tracker is not None:
                    tracker.log(record, step)
                postfix.update(bpb=f"{record['eval_bits_per_byte']:.3f}±{record['eval_bits_per_byte_se']:.3f}")
        if bar is not None:
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
        if saving:
            extra = {"sample.txt": greedy_sample(student, held_out, tokenizers["student"], step)} \
                if held_out is not None and master else None
            last_saved = checkpoint.save(cfg, step, wrapped, student, optimizer, tokenizers, fsdp, rank, extra)
    if bar is not None:
        bar.close()
    if tracker is not None:
        tracker.close()
    if metrics is not None:
        metrics.close()
    if distributed:
        dist.destroy_process_group()
    return {"history": history, "eval": eval_history, "checkpoint": last_saved or (checkpoint.checkpoints(cfg.output_dir) or [None])[-1],
            "metrics": metrics_path}


# --------------------------------------------------------------------------- what the run says
def progress_fields(record: dict) -> dict:
    """The progress bar's postfix: the losses, lambda (TIDAL methods), lr and real tokens/s."""
    fields = {"loss": f"{record['loss']:.3f}", "ce": f"{record['ce']:.3f}", "distill": f"{record['distill']:.4f}"}
    if record.get("lambda") is not None:
        fields["lambda"] = f"{record['lambda']:.2f}"
    fields.update(lr=f"{record['lr']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
    return fields


def print_summary(cfg: Config, student, teacher, dataset, world: int, device, resume_from, step: int) -> None:
    """What the run is about to do: models, method, data and devices, before the first step."""
    def describe(model, role):
        params = sum(p.numel() for p in model.parameters())
        arch = type(model.decoder).__name__.removesuffix("ForCausalLM")
        block = f", block {model.block_size}" if model.kind == "bd3lm" else ""
        return (f"  {role:<8} {model.kind.upper()} ({arch}, {params / 1e6:.2f}M parameters, vocab {model.vocab_size}"
                f"{block}){' frozen' if role == 'teacher' else ''}")

    method = cfg.method + (f", CompDemo (demo ratio {cfg.demo_ratio})" if cfg.compdemo else "")
    sample = [dataset[i] for i in range(0, len(dataset), max(1, len(dataset) // 64))][:64]
    maskable = sum(sum(e.student_maskable) for e in sample) / max(1, sum(len(e.student_input_ids) for e in sample))
    per_step = cfg.batch_size * cfg.grad_accum * world
    threads = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    lines = [f"tide.train: --method {method} --pipeline {cfg.pipeline}, steps {step} -> {cfg.max_steps}"
             + (f" (resumed from {resume_from})" if resume_from else ""),
             describe(student, "student")]
    if teacher is not None:
        lines.append(describe(teacher, "teacher"))
    lines += [f"  data     {cfg.data}: {len(dataset)} examples, {maskable:.0%} of their student tokens maskable "
              f"(of {len(sample)} examples); {per_step} sequences x {cfg.seq_len} = {per_step * cfg.seq_len} "
              f"student positions per step ({cfg.batch_size} x {cfg.grad_accum} accum x {world} process(es))",
              f"  device   {device}{threads}, {'bf16 autocast' if device.type == 'cuda' and cfg.dtype == 'bf16' else 'fp32'}"
              f"; output {cfg.output_dir} (metrics.jsonl{', ' + cfg.report_to if cfg.report_to != 'none' else ''})"]
    print("\n".join(lines), flush=True)


# --------------------------------------------------------------------------- setup helpers
def with_mask_token(tokenizer):
    """Add the student's diffusion mask token (and a pad token) to its tokenizer if it lacks them."""
    if MASK_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [MASK_TOKEN]})
    tokenizer.mask_token = MASK_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or MASK_TOKEN
    return tokenizer


def held_out_record(student, records, tokenizer, cfg: Config, step: int) -> dict:
    """`--eval-data`: the student's held-out negative ELBO (tide.evaluate.elbo), a metrics.jsonl line."""
    student.eval()
    result = evaluate.elbo(student, records, tokenizer=tokenizer, samples=cfg.eval_samples, seed=cfg.seed,
                           batch_size=cfg.batch_size, seq_len=cfg.seq_len, progress=False)
    student.train()
    return {"step": step, "eval_bits_per_byte": result.bits_per_byte, "eval_bits_per_byte_se": result.bits_per_byte_se,
            "eval_bits_per_token": result.bits_per_token, "eval_tokens": result.tokens}


def greedy_sample(student, records, tokenizer, step: int, prompt_tokens: int = 16, new_tokens: int = 32) -> str:
    """A short greedy sample (tide.generate) from the start of the first held-out text: sample.txt
    in each checkpoint."""
    from tide.data import render_chat
    first = records[0]
    text = first if isinstance(first, str) else render_chat(first, tokenizer).text
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"][:prompt_tokens]
    student.eval()
    new_ids = generate(student, [prompt], new_tokens, eos_token_id=tokenizer.eos_token_id)[0]
    student.train()
    return (f"--- prompt: the first {len(prompt)} tokens of the held-out data\n{tokenizer.decode(prompt)}\n"
            f"--- greedy continuation at step {step} ({len(new_ids)} tokens)\n{tokenizer.decode(new_ids)}\n")


def fixed_length(batch: dict, cfg: Config, collate) -> dict:
    """Pad a collated batch to exactly seq_len / teacher length, so the attention masks stay cached;
    drop an attention mask that has no padding (checked on the CPU, before the copy to the device)."""
    for side, length, pad_id in (("student", cfg.seq_len, collate.student_pad_id),
                                 ("teacher", teacher_length(cfg), collate.teacher_pad_id)):
        pad = length - batch[f"{side}_input_ids"].shape[1]
        for key, value in ((f"{side}_input_ids", pad_id), (f"{side}_attention_mask", 0),
                           (f"{side}_maskable", False), (f"{side}_chunk_ids", -1)):
            batch[key] = nn.functional.pad(batch[key], (0, pad), value=value)
        if batch[f"{side}_attention_mask"].all():
            del batch[f"{side}_attention_mask"]
    batch["num_chunks"] = int(batch["num_chunks"])
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def teacher_length(cfg: Config) -> int:
    return cfg.teacher_seq_len if cfg.teacher_seq_len and cfg.pipeline != "shared" else cfg.seq_len


def build_data(cfg: Config, tokenizers: dict):
    """`tide.data` examples for both tokenizers, and its collator; every chat row checked, and
    the examples with a maskable token counted (none: an error), before anything trains.

    `--data`: a folder written by `python -m tide.data prepare`, a .jsonl/.json chat file (a
    "messages" column), or a text file / folder of .txt/.md/.py files cut at line ends into
    pieces of about 4 characters per student token.
    """
    from tide import data
    mode = cfg.pipeline if cfg.needs_teacher else "shared"
    teacher_tok = tokenizers["teacher"] if mode != "shared" else None
    lengths = dict(student_max_length=cfg.seq_len, teacher_max_length=teacher_length(cfg))
    try:
        if data.is_prepared(cfg.data):
            dataset = data.PreparedDataset(cfg.data, student_tokenizer=tokenizers["student"],
                                           teacher_tokenizer=teacher_tok, mode=mode, **lengths)
        else:
            if cfg.data.endswith((".jsonl", ".json")):
                records = data.load_chat_dataset(cfg.data)
            else:
                records = data.load_text_records(cfg.data, suffixes=(".txt", ".md", ".py"), max_chars=4 * cfg.seq_len)
            dataset = data.DistillationDataset(records, student_tokenizer=tokenizers["student"],
                                               teacher_tokenizer=teacher_tok, mode=mode, **lengths)
        data.check_learnable(dataset)
    except ValueError as error:
        raise SystemExit(f"--data {cfg.data}: {error}") from None
    return dataset, data.DistillationCollator.for_tokenizers(tokenizers["student"], teacher_tok)


def load_tokenizers(cfg: Config) -> dict:
    from transformers import AutoTokenizer
    student_path = cfg.student_tokenizer or cfg.student or cfg.teacher
    teacher_path = cfg.teacher_tokenizer or cfg.teacher
    out = {"student": with_mask_token(AutoTokenizer.from_pretrained(student_path, local_files_only=True)),
           "teacher": None}
    if cfg.needs_teacher:  # the teacher's mask id: --teacher-mask-token-id, its config.json, or this tokenizer
        out["teacher"] = AutoTokenizer.from_pretrained(teacher_path, local_files_only=True,
                                                       trust_remote_code=cfg.trust_remote_code)
        if out["teacher"].pad_token is None:
            out["teacher"].pad_token = out["teacher"].eos_token or out["teacher"].unk_token
    return out


def load_teacher(cfg: Config, tokenizer, device, use_bf16: bool, fsdp: bool) -> nn.Module:
    """The frozen teacher from `--teacher DIR`: a tide checkpoint, a native Hugging Face decoder run
    bidirectionally (`--teacher-kind`, mask id, block size, concat order), or custom code
    (`--trust-remote-code`). bf16 on CUDA; under FSDP it is read on the CPU and `shard_frozen`
    moves it to the GPU one layer shard at a time."""
    from tide.models import default_attention
    try:
        raw = read_config(cfg.teacher)
        if not (cfg.teacher_kind or raw.get("tide_kind")):
            raise ValueError(f"{cfg.teacher} is not a tide checkpoint (no tide_kind in its config.json): pass "
                             f"--teacher-kind mdlm (full bidirectional) or bd3lm (block diffusion)")
        mask_id = cfg.teacher_mask_token_id if cfg.teacher_mask_token_id >= 0 else raw.get("mask_token_id")
        if mask_id is None:
            mask_id = tokenizer.mask_token_id  # the teacher tokenizer's mask token, if it has one
        if mask_id is None:
            raise ValueError(f"{cfg.teacher}: no mask token id (no mask_token_id in config.json, no mask token in "
                             f"the teacher tokenizer): pass --teacher-mask-token-id ID")
        kind = cfg.teacher_kind or raw.get("tide_kind")
        teacher = load_model(cfg.teacher, kind=cfg.teacher_kind or None, block_size=cfg.teacher_block_size or None,
                             mask_token_id=mask_id, concat_order=cfg.teacher_concat_order or None,
                             trust_remote_code=cfg.trust_remote_code, lm_head=cfg.teacher_lm_head or None,
                             device="cpu" if fsdp else device, dtype=torch.bfloat16 if use_bf16 else None,
                             attn_implementation=default_attention(kind, device) if use_bf16 else "sdpa")
    except (ValueError, FileNotFoundError) as err:  # a config error, said as one
        raise SystemExit(f"--teacher: {err}") from None
    return teacher.eval().requires_grad_(False)


def shard_frozen(model: nn.Module, device) -> None:
    """FSDP2 `fully_shard` on each layer of the frozen teacher: every rank holds 1/world of the layer
    weights and gathers one layer at a time in forward. Embeddings, final norm and LM head stay whole
    on every rank (the fused loss reads the head weight directly): moved to `device` here; the layers
    are moved by fully_shard.

    `reshard_after_forward=True` is explicit: no FSDP module wraps the whole teacher, so each layer is
    its own FSDP root, and FSDP2 keeps a root's parameters gathered after forward when the option is
    left to its default (for the backward that would follow; a frozen teacher has none). With the
    default, every layer stayed whole on every rank from the first step on: a replicated teacher."""
    from torch.distributed.fsdp import fully_shard
    layers = model.layers
    inside = {id(m) for m in layers.modules()}
    for layer in layers:
        fully_shard(layer, reshard_after_forward=True)
    moved = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module._parameters.values():
            if param is not None and id(param) not in moved:  # tied weights are moved once, stay tied
                param.data = param.data.to(device)
                moved.add(id(param))
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def make_student(cfg: Config, tokenizer, resume_from: str | None, device) -> nn.Module:
    """Resume point > `--student DIR` > a fresh model of `--student-arch` size.

    `--student DIR` of a plain causal LM (any native architecture, e.g. Qwen3-0.6B) becomes a
    BD3LM with its weights kept: the mask token is added to the tokenizer and, when the
    embedding matrix has no free row for it, the embeddings (and an untied head) are resized.
    """
    mask_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if resume_from:
        return load_model(resume_from, device=device)
    if cfg.student:
        try:
            tide_kind = read_config(cfg.student).get("tide_kind")
            student = load_model(cfg.student, kind=cfg.student_kind, block_size=cfg.block_size,
                                 mask_token_id=mask_id, device=device)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(f"--student: {err}") from None
        if tide_kind is None and student.vocab_size < len(tokenizer):  # a plain causal LM: room for the mask
            student.decoder.resize_token_embeddings(len(tokenizer))
        if student.kind == "bd3lm":
            student.block_size = cfg.block_size
        return student
    config = build_config(cfg.student_arch, len(tokenizer), cfg.student_hidden, cfg.student_layers,
                          cfg.student_heads, intermediate_size=cfg.student_intermediate or None,
                          num_kv_heads=cfg.student_kv_heads or None, max_position_embeddings=max(cfg.seq_len, 128))
    return build_model(cfg.student_kind, config, block_size=cfg.block_size, mask_token_id=mask_id, device=device)


def check_pair(cfg: Config, student, teacher, tokenizers) -> None:
    """Student/teacher/tokenizer consistency, before any training."""
    if len(tokenizers["student"]) > student.vocab_size:
        raise SystemExit(f"student vocabulary ({student.vocab_size}) is smaller than its tokenizer "
                         f"({len(tokenizers['student'])}): pass the matching --student-tokenizer")
    if teacher is None:
        return
    if cfg.pipeline in ("shared", "aligned"):
        # one vocabulary: every teacher token has the same id for the student (the student may add its
        # mask token); the losses compare the first min(V_s, V_t) logits
        s_vocab, t_vocab = tokenizers["student"].get_vocab(), tokenizers["teacher"].get_vocab()
        differ = [tok for tok, i in t_vocab.items() if s_vocab.get(tok) != i]
        if differ:
            raise SystemExit(
                f"--pipeline {cfg.pipeline} needs one tokenizer for student and teacher, but {len(differ)} of the "
                f"teacher's {len(t_vocab)} tokens have other ids for the student (e.g. {differ[:3]}): use "
                f"--pipeline cross with a chunk-level method ({', '.join(CHUNK_METHODS)}), or the teacher's "
                f"tokenizer for the student (--student-tokenizer {cfg.teacher_tokenizer or cfg.teacher})")
    if teacher.mask_token_id >= teacher.vocab_size:
        raise SystemExit(f"teacher mask token id {teacher.mask_token_id} is outside its vocabulary")
    if teacher.kind == "bd3lm" and teacher_length(cfg) % teacher.block_size:
        raise SystemExit(f"the BD3LM teacher's block size {teacher.block_size} must divide the teacher length "
                         f"{teacher_length(cfg)}: change --teacher-seq-len (or --seq-len)")


if __name__ == "__main__":
    if len(sys.argv) == 1:  # no arguments: the built-in CPU demo, which calls main(argv) itself
        from tide.demo import main as demo_main
        demo_main()
    else:
        main()
