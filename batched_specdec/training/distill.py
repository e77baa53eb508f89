"""Distil a small draft for a target: ``python -m batched_specdec.training``.

Pipeline (every stage is cached under ``--output-dir``, so an interrupted run resumes where it stopped):

1. Prompts: the built-in chat prompts or a file, minus ``--eval-prompts`` held-out prompts that training never
   sees, plus (with ``self``) user turns the target writes itself by sampling from its chat template.
2. Data: the target's own sampled continuations, made with the library's batched generation
   (:func:`batched_specdec.autoregressive_generate_batch`). A logits processor records the target's top-k
   next-token log-probabilities at every generated position while it samples, so the teacher distribution
   costs no second target forward. Rows run without an EOS stop so that they stay aligned with the recorded
   steps; past the end of a turn the target keeps writing further chat turns, which is still its own text.
3. Vocabulary subset: the ``--vocab-subset`` ids the target emits or ranks first most often in that data.
4. Training: a :class:`~batched_specdec.drafting.heads.SubsetHeadDraft` (``--layers`` decoder layers initialised
   from target layers, or of a narrower ``--width`` with random initialisation and projections to and from the
   target's width; final norm, subset head over the target's output embedding), loss
   ``KL(p_target || q_draft)`` where ``p_target`` is the recorded top-k distribution restricted to the subset and
   renormalised, and ``q_draft`` the draft's softmax over the subset. AdamW, linear warm-up, cosine decay.
   With ``--kind feature``, an EAGLE-style :class:`~batched_specdec.drafting.heads.FeatureHeadDraft` over the
   target's own hidden states instead (:mod:`batched_specdec.training.feature`); with ``--kind eagle3`` an EAGLE-3
   head over three target layers, saved in the public EAGLE-3 layout (:mod:`batched_specdec.training.eagle3`).
5. Evaluation on the held-out prompts: greedy speculative decoding with the draft (``--gamma``), its acceptance
   rate, its exactness against target-only decoding, and the speedup over target-only decoding in the same run,
   at batch 1 and at ``--eval-batch-size``.

Prompts may be token ids (a JSONL file with an ``"ids"`` list per line), so targets without a tokenizer work.
Stages 1-3 live in :mod:`batched_specdec.training.data`, the draft's files in :mod:`batched_specdec.training.save`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from batched_specdec.training.data import (
    DistillError,
    base_prompts,
    choose_vocab_subset,
    data_key,
    generate_data,
    load_target_and_tokenizer,
    self_prompts,
    target_description,
)
from batched_specdec.training.loop import TrainSet, evaluate, print_eval, train

__all__ = ["DistillError", "build_parser", "main", "run"]

DEFAULT_OUTPUT_DIR = "distill-run"


# --- arguments ------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m batched_specdec.training",
        description="Distil a small speculative-decoding draft from a target model on the target's own generations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--target", default="embedded",
                   help="target model: embedded (SmolLM2-135M-Instruct), a local model directory or a .gguf file")
    p.add_argument("--prompts", default="built-in,self",
                   help="comma-separated prompt sources: built-in, self (the target writes user turns), or a FILE "
                        "(text: one prompt per line; JSONL: a \"prompt\" string or an \"ids\" token-id list per line)")
    p.add_argument("--self-prompts", type=int, default=96,
                   help="how many user turns the target writes when --prompts includes self")
    p.add_argument("--eval-prompts", type=int, default=8,
                   help="prompts held out of training (taken from the built-in/file prompts) for the final evaluation")
    p.add_argument("--sequences", type=int, default=256,
                   help="training sequences to generate (prompts are cycled)")
    p.add_argument("--gen-len", type=int, default=160, help="tokens the target generates per training sequence")
    p.add_argument("--data-budget-s", type=float, default=None,
                   help="stop generating new data chunks after this many seconds and train on the chunks made so far "
                        "(cached chunks are always used)")
    p.add_argument("--gen-batch-size", type=int, default=32, help="rows per batched generation call")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature of the data generation")
    p.add_argument("--teacher-top-k", type=int, default=32,
                   help="teacher log-probabilities recorded per position (the loss uses these, renormalised)")
    p.add_argument("--kind", default="tokens", choices=["tokens", "feature", "eagle3"],
                   help="tokens: a small LM over token ids (SubsetHeadDraft); feature: an EAGLE-style head over the "
                        "target's own final hidden states (FeatureHeadDraft, see batched_specdec.training.feature); "
                        "eagle3: an EAGLE-3 head over three target layers, saved in the public EAGLE-3 layout "
                        "(vLLM and SGLang load it; batched_specdec.training.eagle3)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the draft (default: 2 for --kind tokens, 1 for --kind feature and eagle3, "
                        "which has exactly 1)")
    p.add_argument("--width", type=int, default=0,
                   help="hidden size of the draft's layers (0: the target's); a narrower draft gets trained "
                        "projections to and from the target's width and needs --init random")
    p.add_argument("--init", default="even",
                   help="draft layer initialisation: even (evenly spaced target layers, first and last included), "
                        "first (the first N layers), random, or a comma-separated list of N target layer indices")
    p.add_argument("--feature-weight", type=float, default=None,
                   help="--kind feature: weight of the feature regression (smooth L1) next to the KL term (default "
                        "1.0; --kind eagle3 trains on the KL term alone: 0)")
    p.add_argument("--feature-noise", type=float, default=0.1,
                   help="--kind feature/eagle3: Gaussian noise on input features during training, relative to their "
                        "RMS")
    p.add_argument("--unroll", type=int, default=2,
                   help="--kind feature/eagle3: draft positions trained per pair (2+: later passes read the head's "
                        "own predicted features, as drafts after the first do)")
    p.add_argument("--vocab-subset", type=int, default=8192,
                   help="size of the draft's output vocabulary (most frequent ids in the data); 0 = full vocabulary")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int, default=256, help="training sequences are truncated to this many tokens")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto",
                   help="dtype of the target during generation and evaluation (auto: float32 on CPU, bfloat16 on "
                        "CUDA); the draft trains in float32")
    p.add_argument("--storage-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the saved draft tensors")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="run directory: cached data, checkpoint.pt, and the final draft in OUTPUT_DIR/draft")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT_DIR/checkpoint.pt (step count, optimizer and schedule included)")
    p.add_argument("--checkpoint-every", type=int, default=20, help="write a checkpoint every K steps (and on Ctrl-C)")
    p.add_argument("--data-only", action="store_true", help="stop after generating (and caching) the data")
    p.add_argument("--eval-only", metavar="DRAFT_DIR",
                   help="skip data and training; evaluate the draft saved in DRAFT_DIR on the held-out prompts")
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per step in the evaluation")
    p.add_argument("--eval-gen-len", type=int, default=96,
                   help="tokens generated per held-out prompt in the evaluation")
    p.add_argument("--eval-batch-size", type=int, default=4, help="batch size of the batched evaluation (also batch 1)")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt split, generation and training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(args) -> None:
    if args.layers is None:
        args.layers = 2 if args.kind == "tokens" else 1
    if args.kind != "tokens" and args.width:
        raise DistillError(f"--kind {args.kind} drafts have the target's width; got --width {args.width}")
    if args.kind == "eagle3" and (args.layers != 1 or args.feature_weight or args.init != "even"):
        raise DistillError(f"--kind eagle3 heads have one layer, start from the target's last layer and train on the "
                           f"KL term alone; got --layers {args.layers}, --init {args.init} and --feature-weight "
                           f"{args.feature_weight}")
    if args.feature_weight is None:
        args.feature_weight = 0.0 if args.kind == "eagle3" else 1.0
    if args.feature_weight < 0 or args.feature_noise < 0:
        raise DistillError(f"--feature-weight and --feature-noise must be >= 0, got {args.feature_weight} and "
                           f"{args.feature_noise}")
    for name in ("steps", "self_prompts", "eval_prompts", "vocab_subset", "checkpoint_every", "threads", "width"):
        if getattr(args, name) < 0:
            raise DistillError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("sequences", "gen_len", "gen_batch_size", "teacher_top_k", "layers", "batch_size", "seq_len", "unroll",
                 "gamma", "eval_gen_len", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise DistillError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lr > 0:
        raise DistillError(f"--lr must be > 0, got {args.lr}")
    if not args.temperature > 0:
        raise DistillError(f"--temperature must be > 0, got {args.temperature}")


# --- model construction ---------------------------------------------------------------------------------------------


def init_layers(spec: str, num_layers: int, target_layers: int) -> list[int] | None:
    if spec == "random":
        return None
    if spec == "even":
        if num_layers == 1:
            return [target_layers - 1]
        return [round(i * (target_layers - 1) / (num_layers - 1)) for i in range(num_layers)]
    if spec == "first":
        return list(range(num_layers))
    try:
        ids = [int(x) for x in spec.split(",")]
    except ValueError as exc:
        raise DistillError(f"--init {spec!r}: expected even, first, random or a comma-separated list of ints") from exc
    if len(ids) != num_layers or not all(0 <= i < target_layers for i in ids):
        raise DistillError(f"--init {spec!r}: expected {num_layers} layer indices in [0, {target_layers})")
    return ids


def draft_plan(target, args):
    """The draft's Llama config and the target layers it copies (None: random), checked against the target."""
    from batched_specdec.training.save import draft_config_from_target

    layer_ids = init_layers(args.init, args.layers, int(target.config.num_hidden_layers))
    width = args.width or int(target.config.hidden_size)
    if width != int(target.config.hidden_size) and layer_ids is not None:
        raise DistillError(f"--width {width} differs from the target's hidden size {target.config.hidden_size}, so "
                           f"--init {args.init} cannot copy target layers; use --init random")
    try:
        return draft_config_from_target(target.config, args.layers, width), layer_ids
    except ValueError as exc:
        raise DistillError(f"--width: {exc}") from exc


def main_job_prompts(tokenizer) -> frozenset:
    """Token ids of the prompts ``python -m batched_specdec.main`` decodes by default (the first built-in ones):
    never trained on, so that the main job measures a draft on prompts it has not seen."""
    from batched_specdec.prompts import BUILTIN_NUM_PROMPTS, builtin_prompts, encode_prompts

    if tokenizer is None:
        return frozenset()
    return frozenset(tuple(p) for p in encode_prompts(tokenizer, builtin_prompts()[:BUILTIN_NUM_PROMPTS]))


def _feature_setup(target, chunks, vocab_ids, args, data_dir: Path, exclude: frozenset):
    """A feature or EAGLE-3 draft, its training set with the target's features (cached next to the data), and its
    loss."""
    from batched_specdec.training.eagle3 import build_eagle3_draft
    from batched_specdec.training.feature import FeatureTrainSet, build_feature_draft, feature_loss

    if args.kind == "eagle3":
        draft = build_eagle3_draft(target, vocab_ids)
        layer_ids = list(draft.feature_layers)
    else:
        layer_ids = init_layers(args.init, args.layers, int(target.config.num_hidden_layers))
        draft = build_feature_draft(target, vocab_ids, args.layers, layer_ids)
    train_set = FeatureTrainSet(chunks, args.seq_len, exclude)
    train_set.attach_features(target, data_dir / "features", progress=not args.no_progress,
                              layers=draft.feature_layers)
    teacher = target.get_output_embeddings().weight.detach()[torch.as_tensor(vocab_ids)].float()

    def loss_fn(ids, feats, mask):
        return feature_loss(draft, ids, feats, mask, teacher=teacher.to(ids.device), feature_weight=args.feature_weight,
                            noise=args.feature_noise, unroll=args.unroll)

    return draft, layer_ids, train_set, loss_fn


def build_draft(target, args, vocab_ids: torch.Tensor):
    from batched_specdec.drafting.heads import SubsetHeadDraft
    from batched_specdec.training.save import init_from_target

    if getattr(target.config, "model_type", None) not in ("llama",) and not hasattr(target, "model"):
        raise DistillError("the draft is built from Llama-style decoder layers; the target must be a Llama-like LM")
    config, layer_ids = draft_plan(target, args)
    draft = SubsetHeadDraft(config, target, vocab_ids)
    try:
        init_from_target(draft, target, layer_ids)
    except RuntimeError as exc:
        raise DistillError(f"cannot initialise the draft from target layers {layer_ids}: {exc}".splitlines()[0]) \
            from exc
    return draft, layer_ids


# --- main -----------------------------------------------------------------------------------------------------------


def _sources(args) -> list[str]:
    sources = [s.strip() for s in args.prompts.split(",") if s.strip()]
    if not sources:
        raise DistillError("--prompts is empty: expected built-in, self, or a FILE")
    for src in sources:
        if src not in ("built-in", "self") and not Path(src).is_file():
            raise DistillError(f"prompt source {src!r} is not built-in, self, or an existing file")
    return sources


def _split_prompts(pool: list[list[int]], args) -> tuple[list[list[int]], list[list[int]]]:
    """``(eval_prompts, train_prompts)``: ``--eval-prompts`` of the built-in/file prompts held out, by seed."""
    shuffled = pool[:]
    random.Random(args.seed).shuffle(shuffled)
    if args.eval_prompts > len(shuffled):
        raise DistillError(f"--eval-prompts {args.eval_prompts} is more than the {len(shuffled)} built-in/file prompts")
    return shuffled[: args.eval_prompts], shuffled[args.eval_prompts:]


def _training_sequences(target, tokenizer, sources, train_prompts, args, out_dir: Path) -> list[list[int]]:
    """The prompts of every training sequence: the training prompts plus (with ``self``) the target's own user
    turns (cached), cycled to ``--sequences`` and shuffled, each cut to leave room for ``--gen-len``."""
    if "self" in sources:
        sp_path = out_dir / f"self_prompts-{args.self_prompts}-seed{args.seed}.json"
        if sp_path.is_file():
            written = json.loads(sp_path.read_text())
        else:
            t0 = time.perf_counter()
            written = self_prompts(target, tokenizer, args.self_prompts, args.seed, not args.no_progress)
            sp_path.write_text(json.dumps(written))
            print(f"{len(written)} self-written prompts in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        train_prompts = train_prompts + written
    if not train_prompts:
        raise DistillError("no training prompts left after holding out --eval-prompts")
    seqs = [train_prompts[i % len(train_prompts)] for i in range(args.sequences)]
    random.Random(args.seed + 1).shuffle(seqs)
    max_pos = getattr(target.config, "max_position_embeddings", None)
    if max_pos is not None:
        seqs = [s[-(max_pos - args.gen_len - 2):] for s in seqs]
    return seqs


def _data(target, seqs: list[list[int]], args, out_dir: Path, summary: dict) -> tuple[list[dict], Path]:
    data_dir = out_dir / f"data-{data_key(args, seqs)}"
    t0 = time.perf_counter()
    chunks = generate_data(target, seqs, args, data_dir)
    summary["data_time_s"] = time.perf_counter() - t0
    summary["data_tokens"] = sum(int(ch["gen"].numel()) for ch in chunks)
    summary["data_sequences"] = sum(len(ch["prompts"]) for ch in chunks)
    print(f"data: {summary['data_sequences']} sequences, {summary['data_tokens']} generated tokens in {data_dir}",
          file=sys.stderr)
    return chunks, data_dir


def _train_draft(target, tokenizer, chunks, data_dir: Path, sources, eos_token_ids, args, out_dir: Path, device,
                 summary: dict):
    """Choose the vocabulary subset, build the draft and its training set, and train it; returns
    ``(draft, layer_ids, train result)``."""
    vocab_ids = choose_vocab_subset(chunks, args.vocab_subset, int(target.config.vocab_size), eos_token_ids)
    covered = torch.zeros(int(target.config.vocab_size), dtype=torch.bool)
    covered[vocab_ids] = True
    gen_all = torch.cat([ch["gen"].flatten() for ch in chunks])
    summary["subset_coverage"] = float(covered[gen_all].float().mean())
    print(f"vocabulary subset: {len(vocab_ids)} ids cover {summary['subset_coverage']:.4f} of generated tokens",
          file=sys.stderr)
    exclude = main_job_prompts(tokenizer) if "built-in" in sources else frozenset()
    if exclude:
        left_out = sum(tuple(p) in exclude for ch in chunks for p in ch["prompts"])
        summary["main_job_sequences_left_out"] = left_out
        print(f"{left_out} sequences of the prompts the main job decodes by default are left out of training",
              file=sys.stderr)
    if args.kind != "tokens":
        draft, layer_ids, train_set, loss_fn = _feature_setup(target, chunks, vocab_ids, args, data_dir, exclude)
    else:
        draft, layer_ids = build_draft(target, args, vocab_ids)
        train_set, loss_fn = TrainSet(chunks, args.seq_len, exclude), None
    draft.to(device)
    summary["init_layers"] = layer_ids
    result = train(draft, train_set, vocab_ids, args, out_dir, device, loss_fn)
    summary.update({k: v for k, v in result.items() if k != "losses"})
    losses = result["losses"]
    if losses:
        n = max(1, min(10, len(losses) // 4))
        summary["loss_first"] = sum(losses[:n]) / n
        summary["loss_last"] = sum(losses[-n:]) / n
        print(f"loss: first {n} steps {summary['loss_first']:.4f} -> last {n} steps {summary['loss_last']:.4f}")
    return draft, layer_ids, result


def _save(draft, layer_ids, result: dict, target, args, out_dir: Path, summary: dict) -> Path:
    """Write the draft (an EAGLE-3 head in the public layout) and its manifest (the target's name and weight
    checksum, what the training recorded)."""
    from batched_specdec.training.eagle3 import save_eagle3
    from batched_specdec.training.save import save_draft, write_manifest

    metadata = {
        "target": args.target, "kind": args.kind, "layers": args.layers, "width": draft.config.hidden_size,
        "init_layers": layer_ids, "steps": result["steps"], "sequences": summary["data_sequences"],
        "gen_len": args.gen_len, "data_tokens": summary["data_tokens"], "loss_first": summary.get("loss_first"),
        "loss_last": summary.get("loss_last"),
    }
    dtype = getattr(torch, args.storage_dtype)
    if args.kind == "eagle3":
        draft_dir = save_eagle3(draft, out_dir / "draft", storage_dtype=dtype)
    else:
        draft_dir = save_draft(draft, out_dir / "draft", storage_dtype=dtype, metadata=metadata)
    write_manifest(draft_dir, target, target_description(args.target), training=metadata)
    print(f"draft saved to {draft_dir}")
    return draft_dir


def run(args) -> dict:
    """Every stage of the pipeline (module docstring); returns the run's summary (also ``summary.json``)."""
    from batched_specdec.model_info import vocab_size
    from batched_specdec.models import ModelLoadError, load_draft, resolve_device
    from batched_specdec.options import resolve_eos

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = _sources(args)
    try:
        device = resolve_device(args.device)
        target, tokenizer = load_target_and_tokenizer(args.target, device, args.dtype)
    except ModelLoadError as exc:
        raise DistillError(str(exc)) from exc
    eos_token_ids = resolve_eos(None, target, tokenizer, vocab_size(target))
    if not args.eval_only:
        draft_plan(target, args)  # bad --layers/--width/--init fail here, before any generation
    eval_prompts, train_prompts = _split_prompts(base_prompts(sources, tokenizer), args)
    if args.eval_only:
        try:
            draft = load_draft(str(args.eval_only), target)  # an EAGLE-3 head or a distilled draft
        except ModelLoadError as exc:
            raise DistillError(str(exc)) from exc
        results = evaluate(draft, target, eval_prompts, args, eos_token_ids)
        print_eval(results, len(eval_prompts), args)
        return {"eval": results}
    summary: dict = {"eval_prompts": len(eval_prompts)}
    seqs = _training_sequences(target, tokenizer, sources, train_prompts, args, out_dir)
    chunks, data_dir = _data(target, seqs, args, out_dir, summary)
    if args.data_only:
        return summary
    draft, layer_ids, result = _train_draft(target, tokenizer, chunks, data_dir, sources, eos_token_ids, args, out_dir,
                                            device, summary)
    if result["interrupted"]:
        print(f"interrupted at step {result['steps']}; rerun with --resume to continue", file=sys.stderr)
        return summary
    draft_dir = _save(draft, layer_ids, result, target, args, out_dir, summary)
    if not args.no_eval and eval_prompts:
        results = evaluate(load_draft(str(draft_dir), target), target, eval_prompts, args, eos_token_ids)
        print_eval(results, len(eval_prompts), args)
        summary["eval"] = results
    summary["total_time_s"] = time.perf_counter() - t_start
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DistillError, ValueError) as exc:
        print(f"error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
