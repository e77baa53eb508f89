"""The training loop of a distilled draft: its token training set, the KL loss, AdamW with warm-up and cosine
decay, checkpoints (``--resume``), and the held-out evaluation through the engine."""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from pathlib import Path

import torch

from batched_specdec.processors import GreedyProcessor
from batched_specdec.training.data import DistillError


class TrainSet:
    """Examples ``(input_ids, teacher ids, teacher log-probs, first loss position)`` from the generated chunks."""

    def __init__(self, chunks: list[dict], seq_len: int, exclude: frozenset = frozenset()) -> None:
        self.items = []
        for ch in chunks:
            if not ch.get("teacher_aligned"):
                raise DistillError("a data chunk was written before the recorded teacher log-probabilities were "
                                   "aligned with their rows (they belong to other prompts of the chunk); delete the "
                                   "run's data-* directory and generate again (--kind feature does not read them)")
            for i, prompt in enumerate(ch["prompts"]):
                if tuple(prompt) in exclude:
                    continue
                gen = ch["gen"][i]
                p = len(prompt)
                # position p-1+j predicts gen[j]; inputs are prompt + gen[:-1]
                ids = torch.cat([torch.tensor(prompt, dtype=torch.int64), gen[:-1]])[:seq_len]
                n_loss = len(ids) - (p - 1)
                if n_loss <= 0:
                    continue
                self.items.append((ids, ch["top_ids"][i, :n_loss], ch["top_vals"][i, :n_loss], p - 1))

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, indices: list[int], device) -> tuple[torch.Tensor, ...]:
        items = [self.items[i] for i in indices]
        width = max(len(it[0]) for it in items)
        k = items[0][1].shape[-1]
        ids = torch.zeros(len(items), width, dtype=torch.int64)
        t_ids = torch.zeros(len(items), width, k, dtype=torch.int64)
        t_vals = torch.full((len(items), width, k), float("-inf"))
        mask = torch.zeros(len(items), width, dtype=torch.bool)
        for r, (x, ti, tv, start) in enumerate(items):
            ids[r, : len(x)] = x
            t_ids[r, start:start + len(ti)] = ti.long()
            t_vals[r, start:start + len(ti)] = tv.float()
            mask[r, start:start + len(ti)] = True
        return ids.to(device), t_ids.to(device), t_vals.to(device), mask.to(device)


def kl_loss(draft, full_to_sub: torch.Tensor, ids, t_ids, t_vals, mask) -> torch.Tensor:
    """Mean over masked positions of KL(p || q): p the teacher's top-k restricted to the subset, renormalised."""
    hidden = draft.hidden_states(ids, use_cache=False)[mask]  # (M, H)
    logq = torch.log_softmax(draft.subset_logits(hidden).float(), dim=-1)  # (M, K)
    sub = full_to_sub[t_ids[mask]]  # (M, k), -1 outside the subset
    vals = t_vals[mask].masked_fill(sub < 0, float("-inf"))
    keep = torch.isfinite(vals).any(dim=-1)
    logp = torch.log_softmax(vals[keep], dim=-1)
    p = logp.exp()
    q_at = logq[keep].gather(1, sub[keep].clamp_min(0))
    terms = torch.where(p > 0, p * (logp - q_at), torch.zeros_like(p))
    return terms.sum(-1).mean() if keep.any() else hidden.sum() * 0.0


def _lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train(draft, train_set, vocab_ids, args, out_dir: Path, device, loss_fn=None) -> dict:
    """Train ``draft`` in place; checkpoint every ``--checkpoint-every`` steps and on Ctrl-C. Returns a summary.

    ``loss_fn(*train_set.batch(indices, device))`` is the loss (default: :func:`kl_loss` of a token draft)."""
    ckpt_path = out_dir / "checkpoint.pt"
    draft.float().train()
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    full_to_sub = torch.full((draft.config.vocab_size,), -1, dtype=torch.int64, device=device)
    full_to_sub[vocab_ids.to(device)] = torch.arange(len(vocab_ids), device=device)
    step, losses, elapsed_before = _resume(ckpt_path, draft, opt, vocab_ids, args, device)
    rng = random.Random(args.seed * 7919 + step)
    order: list[int] = []

    def save(reason: str) -> None:
        state = {k: v for k, v in draft.state_dict().items()}
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"step": step, "draft": state, "optimizer": opt.state_dict(), "losses": losses,
                    "vocab_ids": vocab_ids.cpu(), "elapsed_s": elapsed_before + time.perf_counter() - t0,
                    "args": vars(args)}, tmp)
        tmp.rename(ckpt_path)
        print(f"checkpoint ({reason}) at step {step}: {ckpt_path}", file=sys.stderr, flush=True)

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, initial=step, desc="distill", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    interrupted = False
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while step < args.steps:
            if len(order) < args.batch_size:
                extra = list(range(len(train_set)))
                rng.shuffle(extra)
                order += extra
            idx, order = order[: args.batch_size], order[args.batch_size:]
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, args)
            batch = train_set.batch(idx, device)
            loss = kl_loss(draft, full_to_sub, *batch) if loss_fn is None else loss_fn(*batch)
            losses.append(_optimizer_step(loss, opt, params))
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}", avg10=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
            elif step % 10 == 0 or step == args.steps:
                print(f"step {step}/{args.steps} loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
            if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
                save("periodic")
    except KeyboardInterrupt:
        interrupted = True
        save("interrupted")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()
    if not interrupted:
        save("final")
    draft.eval().requires_grad_(False)
    return {"steps": step, "losses": losses, "interrupted": interrupted,
            "train_time_s": elapsed_before + time.perf_counter() - t0}


def _resume(ckpt_path: Path, draft, opt, vocab_ids, args, device) -> tuple[int, list[float], float]:
    """With ``--resume`` and a checkpoint: load the draft and optimizer state from it (refusing one of another
    vocabulary subset or kind) and return its ``(step, losses, elapsed seconds)``; else a fresh start."""
    if not (args.resume and ckpt_path.is_file()):
        return 0, [], 0.0
    ck = torch.load(ckpt_path, map_location=device, weights_only=False)
    if not torch.equal(ck["vocab_ids"].cpu(), vocab_ids.cpu()):
        raise DistillError(f"{ckpt_path} was trained with another vocabulary subset; remove it or change "
                           "--output-dir")
    if ck.get("args", {}).get("kind", "tokens") != args.kind:
        raise DistillError(f"{ckpt_path} is a checkpoint of a --kind {ck['args'].get('kind', 'tokens')} draft, "
                           f"not --kind {args.kind}; remove it or change --output-dir")
    draft.load_state_dict(ck["draft"], strict=False)
    opt.load_state_dict(ck["optimizer"])
    print(f"resumed from {ckpt_path} at step {ck['step']}", file=sys.stderr, flush=True)
    return ck["step"], ck["losses"], ck.get("elapsed_s", 0.0)


def _optimizer_step(loss, opt, params) -> float:
    """One AdamW step on ``loss`` with gradients clipped to norm 1; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())


def evaluate(draft, target, prompts: list[list[int]], args, eos_token_ids: list[int]) -> dict:
    """Greedy acceptance, exactness and speedup over target-only decoding on ``prompts``, batch 1 and batched."""
    from batched_specdec import autoregressive_generate_batch, speculative_generate_batch

    common = {"logits_processor": GreedyProcessor(), "max_gen_len": args.eval_gen_len,
              "eos_tokens_id": eos_token_ids}
    # warm-up (allocator, first-call overheads) excluded from timings
    speculative_generate_batch(prompts[:1], draft, target, gamma=args.gamma, logits_processor=GreedyProcessor(),
                               max_gen_len=4, eos_tokens_id=[])
    autoregressive_generate_batch(prompts[:1], target, GreedyProcessor(), max_gen_len=4, eos_tokens_id=[])
    results = {}
    for bs in sorted({1, min(args.eval_batch_size, len(prompts))}):
        ar_time = sd_time = 0.0
        ar_tok = sd_tok = acc = prop = rejections = 0
        exact = True
        for i in range(0, len(prompts), bs):
            part = prompts[i:i + bs]
            ar_out, ar_stats = autoregressive_generate_batch(part, target, return_stats=True, **common)
            sd_out, _, sd_stats = speculative_generate_batch(part, draft, target, gamma=args.gamma, **common)
            exact &= ar_out == sd_out
            ar_time += ar_stats.wall_time_s
            sd_time += sd_stats.wall_time_s
            ar_tok += ar_stats.generated_tokens
            sd_tok += sd_stats.generated_tokens
            acc += sum(sd_stats.accepted)
            prop += sum(sd_stats.proposed)
            rejections += sum(sd_stats.acceptance_histogram[: args.gamma])  # row-steps that stopped at a rejection
        results[bs] = {
            "acceptance_rate": acc / max(prop, 1),
            # Leviathan et al.'s alpha, estimated: the chance that a draft token that gets verified is accepted.
            # acceptance_rate also counts drafts after a rejection, which are never verified, so it is lower.
            "per_position_acceptance": acc / max(acc + rejections, 1),
            "target_only_tokens_per_s": ar_tok / ar_time,
            "speculative_tokens_per_s": sd_tok / sd_time,
            "speedup": (sd_tok / sd_time) / (ar_tok / ar_time),
            "exact": exact,
            "tokens": sd_tok,
        }
    return results


def print_eval(results: dict, n_prompts: int, args) -> None:
    print(f"held-out evaluation: {n_prompts} prompts never used for training, greedy, gamma={args.gamma}, "
          f"{args.eval_gen_len} new tokens per prompt")
    for bs, r in results.items():
        print(f"  batch {bs}: acceptance {r['acceptance_rate']:.3f} per draft token (per verified position "
              f"{r['per_position_acceptance']:.3f}), speculative "
              f"{r['speculative_tokens_per_s']:.2f} tok/s vs target-only {r['target_only_tokens_per_s']:.2f} tok/s "
              f"-> speedup {r['speedup']:.2f}x, outputs identical to target-only: {r['exact']}")
