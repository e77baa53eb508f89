"""Prompts and data of the distillation tool (``python -m batched_specdec.training``): the target and its tokenizer,
the training prompts (built-in, files, self-written user turns), the target's own sampled continuations with the
teacher's top-k log-probabilities recorded while sampling, and the draft's vocabulary subset."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from batched_specdec.processors import MultinomialProcessor


class DistillError(ValueError):
    """Bad input to the tool; printed as one line."""


# --- target and prompts ---------------------------------------------------------------------------------------------


def load_target_and_tokenizer(spec: str, device, dtype):
    """The target (eval mode, no grad) and its tokenizer, or None for a model directory without tokenizer files."""
    from batched_specdec.models import load_target, resolve_device, resolve_dtype

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and not any(
        (path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        from transformers import AutoModelForCausalLM

        dev = resolve_device(device)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=resolve_dtype(dtype, dev), local_files_only=True)
        model.to(dev).eval().requires_grad_(False)
        return model, None
    return load_target(None if spec == "embedded" else spec, device=device, dtype=dtype, quiet=False)


def target_description(spec: str) -> str:
    """The name a draft's manifest gives its target: the embedded model's file, or the spec as given."""
    from batched_specdec.models import EMBEDDED_GGUF, EMBEDDED_NAMES, EMBEDDED_PACKAGE

    if spec.lower() in EMBEDDED_NAMES:
        return f"{EMBEDDED_GGUF.removesuffix('.gguf')} ({EMBEDDED_PACKAGE} GGUF, de-quantized)"
    return spec


def _read_prompt_file(path: str, tokenizer) -> list[list[int]]:
    from batched_specdec.prompts import PromptFileError, encode_prompts, read_prompts_file

    p = Path(path)
    if not p.is_file():
        raise DistillError(f"prompt source {path!r} is not built-in, self, or an existing file")
    lines = [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if lines and lines[0].lstrip().startswith("{") and '"ids"' in lines[0]:
        out = []
        for i, line in enumerate(lines, start=1):
            try:
                ids = json.loads(line)["ids"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DistillError(f"prompts file {path!r} line {i}: expected {{\"ids\": [int, ...]}}") from exc
            if not ids or not all(isinstance(t, int) for t in ids):
                raise DistillError(f"prompts file {path!r} line {i}: \"ids\" must be a non-empty list of ints")
            out.append(ids)
        return out
    if tokenizer is None:
        raise DistillError(f"prompts file {path!r} holds text but the target has no tokenizer; give token ids "
                           "as JSONL lines {\"ids\": [...]}")
    try:
        return encode_prompts(tokenizer, read_prompts_file(p))
    except PromptFileError as exc:
        raise DistillError(str(exc)) from exc


def base_prompts(sources: list[str], tokenizer) -> list[list[int]]:
    """Token ids of the built-in/file prompts (not the self-written ones), in source order."""
    from batched_specdec.prompts import builtin_prompts, encode_prompts

    out: list[list[int]] = []
    for src in sources:
        if src == "built-in":
            if tokenizer is None:
                raise DistillError("--prompts built-in needs a target with a tokenizer; pass a token-id JSONL file")
            out += encode_prompts(tokenizer, builtin_prompts())
        elif src != "self":
            out += _read_prompt_file(src, tokenizer)
    return out


SELF_PROMPT_OPENERS = (
    "Write", "Explain", "How do I", "What is", "Can you", "Give me", "Why does", "List", "Summarize", "Describe",
    "I need help with", "Tell me about", "Compare", "Create a", "Translate", "What are the", "Help me write",
    "Solve", "Rewrite", "Suggest", "Plan", "Generate", "Define", "Show me how to",
)


def self_prompts(target, tokenizer, n: int, seed: int, progress: bool) -> list[list[int]]:
    """``n`` chat prompts whose user turn the target wrote: an opener word, then sampled text up to end of turn."""
    from batched_specdec import autoregressive_generate_batch
    from batched_specdec.prompts import encode_prompts

    if n == 0:
        return []
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DistillError("--prompts self needs a target whose tokenizer has a chat template")
    marker = "\u2063MARK\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    head = text.split(marker)[0]
    openers = [SELF_PROMPT_OPENERS[i % len(SELF_PROMPT_OPENERS)] for i in range(n)]
    starts = [tokenizer(head + o, add_special_tokens=False)["input_ids"] for o in openers]
    eos_token_ids = [t for t in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
               if isinstance(t, int) and t >= 0]
    gens = autoregressive_generate_batch(starts, target, MultinomialProcessor(1.0), max_gen_len=48,
                                         eos_tokens_id=eos_token_ids, seed=seed, progress=progress)
    users = []
    for opener, gen in zip(openers, gens):
        body = tokenizer.decode([t for t in gen if t not in eos_token_ids], skip_special_tokens=True).strip()
        users.append((opener + " " + body if body and not body[0] in ",.?!'" else opener + body).strip())
    return encode_prompts(tokenizer, users)


# --- data -----------------------------------------------------------------------------------------------------------


class RecordingProcessor(MultinomialProcessor):
    """Samples like :class:`MultinomialProcessor` and records the top-k log-probabilities of every step.

    Only valid while the batch is never compacted (no EOS stop), so row ``i`` of every step is prompt ``i``."""

    def __init__(self, temperature: float, top_k: int) -> None:
        super().__init__(temperature)
        self.record_top_k = top_k
        self.values: list[torch.Tensor] = []
        self.ids: list[torch.Tensor] = []

    def sample(self, logits, generator=None, row_keys=None, draws=None):
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        vals, ids = logprobs.topk(min(self.record_top_k, logprobs.shape[-1]), dim=-1)
        self.values.append(vals.to(torch.float16))
        self.ids.append(ids.to(torch.int32))
        return super().sample(logits, generator, row_keys, draws)


def data_key(args, prompts: list[list[int]]) -> str:
    h = hashlib.sha256(json.dumps([args.target, args.gen_len, args.temperature, args.teacher_top_k, args.seed,
                                   prompts]).encode())
    return h.hexdigest()[:16]


def generate_data(target, prompts: list[list[int]], args, data_dir: Path) -> list[dict]:
    """Generate (or load from ``data_dir``) one chunk per ``--gen-batch-size`` prompts.

    Each chunk: ``prompts`` (list of lists), ``gen`` ``(n, gen_len)`` int64, ``top_vals`` ``(n, gen_len, k)``
    float16 log-probabilities and ``top_ids`` int32."""
    from batched_specdec import autoregressive_generate_batch

    data_dir.mkdir(parents=True, exist_ok=True)
    chunks = []
    bs = args.gen_batch_size
    n_chunks = -(-len(prompts) // bs)
    t0 = time.perf_counter()
    for c in range(n_chunks):
        # The engine holds rows longest prompt first and the recording processor sees them in that order: give them
        # in that order (a stable sort), so that recorded step row i is prompt i of the chunk.
        part = sorted(prompts[c * bs:(c + 1) * bs], key=len, reverse=True)
        path = data_dir / f"chunk_{c:05d}.pt"
        if path.is_file():
            chunks.append(torch.load(path))
            continue
        if chunks and args.data_budget_s is not None and time.perf_counter() - t0 >= args.data_budget_s:
            print(f"data budget of {args.data_budget_s:.0f} s spent: training on {len(chunks)} of {n_chunks} chunks",
                  file=sys.stderr, flush=True)
            break
        proc = RecordingProcessor(args.temperature, args.teacher_top_k)
        gen = autoregressive_generate_batch(part, target, proc, max_gen_len=args.gen_len, eos_tokens_id=[],
                                            seed=args.seed * 100003 + c, progress=not args.no_progress)
        chunk = {
            "prompts": part,
            "gen": torch.tensor(gen, dtype=torch.int64),
            "top_vals": torch.stack(proc.values, dim=1).cpu(),
            "top_ids": torch.stack(proc.ids, dim=1).cpu(),
            "teacher_aligned": True,
        }
        if chunk["top_vals"].shape[:2] != chunk["gen"].shape:
            raise RuntimeError("recorded teacher steps do not match the generated tokens")
        tmp = path.with_suffix(".tmp")
        torch.save(chunk, tmp)
        tmp.rename(path)
        chunks.append(chunk)
        done = (c + 1) * bs
        el = time.perf_counter() - t0
        print(f"data chunk {c + 1}/{n_chunks}: {min(done, len(prompts))} sequences, "
              f"{el:.0f} s elapsed", file=sys.stderr, flush=True)
    return chunks


def choose_vocab_subset(chunks: list[dict], size: int, vocab_size: int, must_have: list[int]) -> torch.Tensor:
    """The ``size`` ids emitted or ranked first most often by the target in the data (plus ``must_have``), sorted."""
    if size == 0 or size >= vocab_size:
        return torch.arange(vocab_size)
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ch in chunks:
        counts += torch.bincount(ch["gen"].flatten(), minlength=vocab_size).double()
        counts += torch.bincount(ch["top_ids"][..., 0].flatten().long(), minlength=vocab_size).double()
        counts += 1e-3 * torch.bincount(ch["top_ids"].flatten().long(), minlength=vocab_size).double()
        for p in ch["prompts"]:
            counts += 1e-2 * torch.bincount(torch.tensor(p), minlength=vocab_size).double()
    counts[torch.tensor(must_have, dtype=torch.int64)] = float("inf")
    # Ties (ids never seen) fall back to the lowest ids: byte-level tokens come first in BPE vocabularies.
    order = torch.argsort(-counts, stable=True)
    return order[:size].sort().values
