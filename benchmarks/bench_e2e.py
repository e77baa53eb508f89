"""End-to-end decoding throughput: our speculative decoding vs target-only baselines, side by side in one run.

Methods (all greedy, same prompts, same number of new tokens, in the same process):

* ``target_only_ours``: ``autoregressive_generate_batch`` (our engine, ragged cache, no draft). The baseline of
  every ``speedup`` in the results.
* ``target_only_sync_read``: ``target_only_ours`` with ``delayed_host_read=False`` (the host reads each step's
  flags as soon as the step ends; on CUDA the default reads them a step late, so the host never waits for the
  device). The default runs again right after it; its ``speedup`` is over the mean of the default's two runs at
  that B (``note`` has both).
* ``hf_generate``: ``transformers`` ``model.generate`` target-only (left-padded batch, ``do_sample=False``).
* ``hf_assisted``: ``transformers`` assisted generation (``assistant_model=`` the draft model, or
  ``prompt_lookup_num_tokens=gamma`` when the draft is the n-gram drafter). It supports batch 1 only: for B > 1
  the call is attempted and the error it raises is recorded (``status=refused``).
* ``speculative_ours``: ``speculative_generate_batch`` with the draft, for every gamma.

Rows: ``tokens_per_s`` (generated tokens of all rows / wall time), ``row_ms_per_token`` (wall time / mean tokens
per row: the per-token latency one row sees), ``speedup`` (tokens/s over ``target_only_ours`` at the same B in the
same run), acceptance rate, tokens per target forward, the acceptance histogram (count of (row, step) pairs that
accepted 0..gamma drafts), peak memory, the time split and the non-model fraction
``(sampling + bookkeeping) / (draft + verify + sampling + bookkeeping)``, and ``matches_target_only`` (every
row's greedy output equals ``target_only_ours``'s, token for token).

CPU (default without CUDA): the embedded SmolLM2-135M-Instruct target (``batched_specdec.models.load_target``) with
its default draft: the distilled draft (``batched_specdec.draft_model.load_distilled_draft``) when it loads, else
the n-gram drafter; real acceptance (``acceptance_kind=real``). Built-in chat prompts.

GPU (default with CUDA): a Qwen2-style 7B-class target and 0.5B-class draft (real-size configs, bf16, RANDOM
weights: no checkpoint is available). Acceptance is controlled by :class:`SyntheticAcceptanceDrafter`: it runs the
real draft model's forward passes (real cost) and then proposes, per draft slot, the token of the known
continuation (the target-only greedy output, computed first) with probability alpha, else the draft model's own
token. Those rows are labelled ``acceptance_kind=synthetic-acceptance``. Each such row records the acceptance it
would have (``expected_acceptance`` = alpha (1 - alpha^gamma) / ((1 - alpha) gamma), accepted per proposed draft)
next to the measured ``acceptance_rate``: in bf16 a verify forward and a one-token forward can break a near-tie
differently, the row leaves the known continuation and its drafts stop matching, so a row whose measured
acceptance falls below 85% of the expected one is marked as drifted and its goal is not judged. ``--dtype float32``
(TF32 matmuls) keeps the target on the known continuation.

``--compile`` runs both engines with ``compile=True`` (CUDA graphs on CUDA). Before anything is timed, a warm-up
pass runs every batch size and gamma once at the full length (untimed): it fills Triton's cache for each (B, gamma)
and, compiled, records every shape's graphs (span and compaction buckets), so no timed run compiles.

    python benchmarks/bench_e2e.py             # CPU: B 1 4, gamma 2 4, 32 new tokens, SmolLM2 + its default draft
    python benchmarks/bench_e2e.py --quick     # CI size
    python benchmarks/bench_e2e.py             # on CUDA: B 1 4 16 64, gamma 2..8, alpha 0.6 0.8 0.9
    python benchmarks/bench_e2e.py --compile   # both engines compiled
    python benchmarks/bench_e2e.py --cuda-graphs   # both engines with cuda_graphs=True (recorded, no inductor)

``--cuda-graphs`` runs both engines with ``cuda_graphs=True``: every decode-sized forward recorded once after eager
warm-up runs and replayed (``batched_specdec.graphs``; on a CPU its checking stand-in, slower than eager). The
warm-up pass records every shape's graphs; the rows say ``compiled=cuda_graphs`` and their ``note`` how many graphs
the timed run recorded (0 when the warm-up covered it) and the warm-up's recordings and seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import KEY_FIELDS, append_rows, cpu_note, pick_device, run_key, synchronize

from batched_specdec import graphs
from batched_specdec.drafting import Drafter, DraftProposal, ModelDrafter
from batched_specdec.engine import autoregressive_generate_batch, speculative_generate_batch
from batched_specdec.processors import GreedyProcessor

FIELDS = KEY_FIELDS + [
    "method", "status", "target", "draft", "acceptance_kind", "alpha", "expected_acceptance", "batch", "gamma",
    "max_new_tokens", "dtype", "compiled",
    "generated_tokens", "wall_s", "tokens_per_s", "row_ms_per_token", "speedup", "acceptance_rate",
    "tokens_per_target_forward", "acceptance_histogram", "target_forwards", "peak_memory_bytes", "peak_memory_kind",
    "draft_s", "verify_s", "sampling_s", "bookkeeping_s", "non_model_frac", "matches_target_only", "goal", "note",
]  # fmt: skip


class SyntheticAcceptanceDrafter(Drafter):
    """Benchmark-only drafter: real draft-model cost, controlled acceptance.

    Every step runs :class:`~batched_specdec.drafting.ModelDrafter`'s forwards on the real draft model, then
    replaces each draft slot ``i`` of row ``b`` with ``known[p_b, g_b + i]`` (the target-only greedy continuation
    of the row's prompt ``p_b`` at the row's next positions, ``g_b`` tokens generated so far) with probability
    ``alpha``. ``known`` is in prompt order; the session's rows are not (it orders them by length, compacts them
    and refills them), so each row finds its prompt by its prompt tokens when it enters (``prompts``, the same
    token lists the session decodes; one host read per entry, none per step). Under greedy verification a slot
    holding the known token is accepted (the target's argmax is that token) and any other token is rejected, so
    per-token acceptance is about ``alpha``. Proposals are deterministic (``probs=None``).
    """

    def __init__(self, draft_model, known: torch.Tensor, alpha: float, prompts: list[list[int]], seed: int = 0) -> None:
        self.inner = ModelDrafter(draft_model)
        self.known = known  # (P, N) int64 on the draft's device, one row per prompt, in prompt order
        self.alpha = alpha
        self.generator = torch.Generator(device=known.device).manual_seed(seed)
        self.index = {tuple(p): i for i, p in enumerate(prompts)}
        self.prompt_lens = self.row_prompts = None

    def _prompts_of(self, token_buffer, rows, lens) -> list[int]:
        tokens = token_buffer.index_select(0, rows).cpu()
        return [self.index[tuple(tokens[r, :n].tolist())] for r, n in enumerate(lens)]

    def start(self, token_buffer, seq_lens, max_seq_len):
        self.inner.start(token_buffer, seq_lens, max_seq_len)
        device = self.known.device
        self.prompt_lens = seq_lens.clone().to(device)
        rows = torch.arange(seq_lens.shape[0], device=token_buffer.device)
        self.row_prompts = torch.tensor(self._prompts_of(token_buffer, rows, seq_lens.tolist()), device=device)

    def admit_rows(self, token_buffer, rows, prompt_lens):
        self.inner.admit_rows(token_buffer, rows, prompt_lens)
        device = self.known.device
        index = rows.to(device)
        self.prompt_lens.index_copy_(0, index, torch.tensor(prompt_lens, device=device))
        found = self._prompts_of(token_buffer, rows, prompt_lens)
        self.row_prompts.index_copy_(0, index, torch.tensor(found, device=device))

    def propose(self, token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws=None):
        own = self.inner.propose(token_buffer, seq_lens, gamma, logits_processor, max_seq_len, draws).tokens
        device = self.known.device
        gen = seq_lens.to(device) - self.prompt_lens
        idx = (gen[:, None] + torch.arange(gamma, device=device)[None, :]).clamp(max=self.known.shape[1] - 1)
        known = self.known.index_select(0, self.row_prompts).gather(1, idx)
        take = torch.rand(known.shape, generator=self.generator, device=device) < self.alpha
        return DraftProposal(tokens=torch.where(take, known, own.to(device)))

    def use_graphs(self, enabled):
        self.inner.use_graphs(enabled)  # the draft model's forwards are what it costs

    def keep_rows(self, rows):
        self.inner.keep_rows(rows)
        index = rows.to(self.known.device)
        self.prompt_lens = self.prompt_lens.index_select(0, index)
        self.row_prompts = self.row_prompts.index_select(0, index)


# --- models ------------------------------------------------------------------------------------------------------


def random_qwen2(size: str, vocab: int, dtype, device):
    """A Qwen2-style model of a real (or toy) size with random weights (no checkpoint available)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shapes = {  # Qwen2.5-7B and Qwen2.5-0.5B shapes
        "7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
               "num_key_value_heads": 4},
        "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                 "num_key_value_heads": 2, "tie_word_embeddings": True},
        # toy shapes of the same layout, for --models toy (checking the script, not timing a GPU)
        "toy-target": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2},
        "toy-draft": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                      "num_key_value_heads": 1, "tie_word_embeddings": True},
    }  # fmt: skip
    config = Qwen2Config(vocab_size=vocab, max_position_embeddings=32768, rope_theta=1e6, **shapes[size])
    config._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval().requires_grad_(False)


def load_cpu_models(args):
    from batched_specdec.model_info import vocab_size
    from batched_specdec.models import load_target
    from batched_specdec.options import resolve_eos

    target, tokenizer = load_target(None, device="cpu", quiet=True)
    draft, draft_name = None, "ngram"
    try:
        from batched_specdec.drafting.heads import load_distilled_draft

        draft = load_distilled_draft(target)
        draft_name = "distilled (batched_specdec.drafting.heads)"
    except Exception as exc:  # noqa: BLE001 -- missing module or files: the documented default draft is n-gram
        print(f"distilled draft not used ({type(exc).__name__}: {exc}); using the n-gram drafter")
    if draft is None:
        from batched_specdec.drafting.ngram import NGramDrafter

        draft = NGramDrafter()
    return target, tokenizer, draft, draft_name, resolve_eos(None, target, tokenizer, vocab_size(target)), None


def cpu_prompts(tokenizer, n: int) -> list[list[int]]:
    from batched_specdec.prompts import builtin_prompts, encode_prompts, select_prompts

    return encode_prompts(tokenizer, select_prompts(builtin_prompts(), n))


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (m,), generator=g).tolist() for m in lens]


# --- runners -----------------------------------------------------------------------------------------------------


def known_tokens(outputs: list[list[int]], device) -> torch.Tensor:
    """(B, N) int64 target-only continuations, zero-padded: the synthetic drafter's known tokens."""
    width = max(len(o) for o in outputs)
    return torch.tensor([o + [0] * (width - len(o)) for o in outputs], dtype=torch.int64, device=device)


@contextlib.contextmanager
def progress(what: str, device):
    """Print ``what`` and, once the block has run (device synchronised), its seconds: a run stopped at a time limit
    shows how far it got."""
    print(f"  {what} ...", end="", flush=True)
    t0 = time.perf_counter()
    yield
    synchronize(device)
    print(f" {time.perf_counter() - t0:.1f} s", flush=True)


def warm_up(all_prompts, batch_sizes, gammas, alpha, target, drafter, run_kw, synthetic, device) -> None:
    """Run every batch size and gamma once, untimed, at the timed runs' length: Triton compiles each kernel
    specialisation here and, with ``compile=True``, every shape's graphs (span and compaction buckets) are compiled
    and recorded here, not in a timed run."""
    t0 = time.perf_counter()
    for B in batch_sizes:
        prompts = all_prompts[:B]
        with progress(f"warm-up B={B} target-only", device):
            ref_out = autoregressive_generate_batch(prompts, target, **run_kw)
        known = known_tokens(ref_out, device) if synthetic else None
        for g in gammas:
            with progress(f"warm-up B={B} gamma={g}", device):
                speculative_generate_batch(prompts, drafter(alpha if synthetic else None, known, prompts), target,
                                           gamma=g, **run_kw)
    synchronize(device)
    print(f"warm-up (every B and gamma once, untimed): {time.perf_counter() - t0:.1f} s")



def truncate(tokens: list[int], eos: list[int], n: int) -> list[int]:
    out = []
    for t in tokens[:n]:
        out.append(t)
        if t in eos:
            break
    return out


def hf_generate(model, prompts, max_new, eos, pad, device, **kwargs):
    """Left-padded ``model.generate``; returns (outputs truncated after the first EOS, wall seconds)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=0,
                             do_sample=False, pad_token_id=pad, eos_token_id=eos or None, **kwargs)  # fmt: skip
    synchronize(device)
    wall = time.perf_counter() - t0
    return [truncate(row, eos, max_new) for row in out[:, width:].tolist()], wall


def split_fields(split: dict | None) -> dict:
    if not split:
        return {}
    total = sum(split[phase] for phase in ("draft", "verify", "sampling", "bookkeeping"))  # a step's phases
    return {"draft_s": split["draft"], "verify_s": split["verify"], "sampling_s": split["sampling"],
            "bookkeeping_s": split["bookkeeping"],
            "non_model_frac": (split["sampling"] + split["bookkeeping"]) / total if total > 0 else None}


def noted(row: dict, stats) -> dict:
    """``row`` with what the run's graph path recorded and replayed added to its ``note`` (``--cuda-graphs``)."""
    if "graphs_recorded" in stats.extra:
        extra = stats.extra
        graph = (f"this run recorded {extra['graphs_recorded']} graphs ({extra['graph_recording_s']:.2f} s), "
                 f"replayed {extra['graph_replays']}")
        row["note"] = "; ".join(x for x in [row.get("note"), graph] if x)
    return row


def stats_fields(stats, batch: int) -> dict:
    per_row = stats.generated_tokens / batch
    return {"generated_tokens": stats.generated_tokens, "wall_s": stats.wall_time_s,
            "tokens_per_s": stats.tokens_per_s,
            "row_ms_per_token": 1e3 * stats.wall_time_s / per_row if per_row else None,
            "tokens_per_target_forward": stats.tokens_per_target_forward, "target_forwards": stats.target_forwards,
            "peak_memory_bytes": stats.peak_memory_bytes, "peak_memory_kind": stats.peak_memory_kind}


def sync_read_row(prompts, target, run_kw, ref_out, base_tps: float, base: dict, B: int, device) -> dict:
    """The ``target_only_sync_read`` row: target-only decoding with ``delayed_host_read=False``, then the default
    (delayed on CUDA) once more, so that the speedup is over the mean of the default's runs before and after it
    (whatever runs first at a batch size is not favoured)."""
    with progress(f"B={B} target-only, synchronous host read", device):
        out, st = autoregressive_generate_batch(prompts, target, return_stats=True, delayed_host_read=False, **run_kw)
    with progress(f"B={B} target-only again", device):
        again = autoregressive_generate_batch(prompts, target, return_stats=True, **run_kw)[1].tokens_per_s
    note = f"default read before / after: {base_tps:.1f} / {again:.1f} tok/s"
    return noted(dict(base, method="target_only_sync_read", status="measured", acceptance_kind="none",
                      speedup=st.tokens_per_s / ((base_tps + again) / 2), matches_target_only=out == ref_out,
                      **stats_fields(st, B), note="; ".join(x for x in [base.get("note"), note] if x)), st)


def gamma_arg(text: str) -> int | str:
    """``--gammas`` values: an integer >= 1, or ``auto`` (the adaptive controller)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'auto', got {text!r}")
    return value


def expected_acceptance(alpha: float, gamma: int | str) -> float | None:
    """Accepted per proposed draft when each of ``gamma`` drafts is right with probability ``alpha`` and verification
    stops at the first wrong one: E[accepted] / gamma = alpha (1 - alpha^gamma) / ((1 - alpha) gamma). None for
    ``gamma="auto"``, whose draft lengths vary from step to step."""
    if gamma == "auto":
        return None
    if alpha >= 1:
        return 1.0
    return alpha * (1 - alpha**gamma) / ((1 - alpha) * gamma)


def drifted(measured: float | None, expected: float) -> bool:
    """True when a synthetic row's measured acceptance is below 85% of the expected one (the target left the known
    continuation, see the module docstring)."""
    return measured is not None and measured < 0.85 * expected


def e2e_goal(batch: int, alpha, speedup: float, measured=None, expected=None, proposed: int | None = None) -> str:
    """End-to-end goals (H100-class, alpha 0.8) this row can speak to; not judged when the acceptance drifted or
    when no draft was verified (``proposed == 0``: gamma auto chose plain target steps throughout, so the row
    measures the engine without speculation, and its ratio to target-only is run-to-run variation)."""
    if alpha != 0.8:
        return ""
    if proposed == 0:
        return "not judged: no drafts verified (plain target steps only)"
    if expected is not None and drifted(measured, expected):
        return f"not judged: acceptance drifted ({measured:.2f} measured, {expected:.2f} expected)"
    need = {1: 2.0, 16: 1.3, 64: 1.0}.get(batch)
    if need is None:
        return ""
    return f">= {need}x at B={batch}: {'met' if speedup >= need else 'NOT met'} ({speedup:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="batch sizes B (default: 1 4 16 64 on CUDA, 1 4 on CPU)")
    parser.add_argument("--gammas", type=gamma_arg, nargs="+", default=None,
                        help="draft tokens per step, or auto for the adaptive controller (default: 2..8 on CUDA, "
                             "2 4 on CPU)")
    parser.add_argument("--alphas", type=float, nargs="+", default=None,
                        help="synthetic acceptance probabilities on CUDA (default: 0.6 0.8 0.9); unused on CPU")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens per row (default: 128 on CUDA, 32 on CPU)")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[64, 192], metavar=("MIN", "MAX"),
                        help="random prompt lengths on CUDA (ragged, uniform in [MIN, MAX]); CPU uses built-in prompts")
    parser.add_argument("--methods", nargs="+", default=None,
                        choices=["target_only_ours", "target_only_sync_read", "hf_generate", "hf_assisted",
                                 "speculative_ours"],
                        help="methods to run (default: all)")
    parser.add_argument("--no-time-split", action="store_true",
                        help="on CUDA, skip the extra collect_stats=True run that measures the time split "
                        "(it synchronises between phases, so tokens/s come from a separate run)")
    parser.add_argument("--models", choices=["auto", "real-size", "toy"], default="auto",
                        help="auto: the real-size random-weight Qwen2 pair with synthetic acceptance on CUDA, the "
                             "embedded model and its draft on CPU; toy: the synthetic-acceptance path with tiny "
                             "random Qwen2 shapes on any device (checks the script, times nothing of interest)")
    parser.add_argument("--compile", action="store_true",
                        help="run both engines with compile=True (CUDA graphs on CUDA); every shape compiles in the "
                             "untimed warm-up pass")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="run both engines with cuda_graphs=True (decode forwards recorded once and replayed, no "
                             "inductor); the untimed warm-up pass records every shape's graphs")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the random-weight CUDA models (float32 allows TF32 matmuls); CPU runs fp32")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the warm-up pass over every (B, gamma) (then first runs include compilation)")
    parser.add_argument("--quick", action="store_true", help="CI size: B 1, gamma 2, 8 new tokens")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the shared CPU machines oversubscribe badly with more)")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts, weights and the synthetic drafter")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to results/e2e.csv")
    args = parser.parse_args(argv)  # fmt: skip
    if args.compile and args.cuda_graphs:
        parser.error("--compile and --cuda-graphs exclude each other (compile records its own graphs)")

    device = pick_device(args.device, parser)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    # the random-weight pair with synthetic acceptance (real sizes, or toy ones), else the embedded model
    synthetic = args.models == "toy" or (args.models == "real-size" or gpu)
    batch_sizes = args.batch_sizes or ([1, 4, 16, 64] if gpu else [1, 4])
    gammas = args.gammas or (list(range(2, 9)) if gpu else [2, 4])
    alphas = args.alphas or [0.6, 0.8, 0.9]
    max_new = args.max_new_tokens or (128 if gpu else 32)
    if args.quick:
        batch_sizes, gammas, alphas, max_new = [1], [2], alphas[:1], 8
    methods = args.methods or ["target_only_ours", "hf_generate", "hf_assisted", "speculative_ours"]
    proc = GreedyProcessor()

    key = run_key(device)
    note = cpu_note(device)
    print(f"{key['device']} | torch {key['torch']} | triton {key['triton']} | commit {key['commit']}")
    if note:
        print(note)
    torch.manual_seed(args.seed)
    if synthetic:
        toy = args.models == "toy"
        vocab = 512 if toy else 152064
        dtype = getattr(torch, args.dtype) if gpu else torch.float32
        if dtype == torch.float32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        short = {torch.bfloat16: "bf16", torch.float32: "fp32 (TF32 matmuls)" if gpu else "fp32"}[dtype]
        target = random_qwen2("toy-target" if toy else "7b", vocab, dtype, device)
        draft_model = random_qwen2("toy-draft" if toy else "0.5b", vocab, dtype, device)
        target_name = f"Qwen2-{'toy' if toy else '7B-class'} config, random weights, {short}"
        draft_name = f"Qwen2-{'toy' if toy else '0.5B-class'} config, random weights, {short} (real forwards)"
        eos, pad = [], 0
        all_prompts = random_prompts(max(batch_sizes), vocab, *args.prompt_len, seed=args.seed)
    else:
        target, tokenizer, draft, draft_name, eos, pad = load_cpu_models(args)
        draft_model = draft if hasattr(draft, "config") else None
        target_name = "SmolLM2-135M-Instruct (embedded GGUF Q4_1, fp32)"
        all_prompts = cpu_prompts(tokenizer, max(batch_sizes))
    print(f"target: {target_name} | draft: {draft_name}")

    run_kw = {"logits_processor": proc, "max_gen_len": max_new, "eos_tokens_id": eos, "pad_token_id": pad,
              "compile": args.compile, "cuda_graphs": args.cuda_graphs}
    compiled = "cuda_graphs" if args.cuda_graphs else args.compile

    def drafter(alpha, known, prompts):
        return SyntheticAcceptanceDrafter(draft_model, known, alpha, prompts, args.seed) if synthetic else draft

    if not args.no_warmup:
        before = graphs.COUNTS.snapshot()
        warm_up(all_prompts, batch_sizes, gammas, max(alphas), target, drafter, run_kw, synthetic, device)
        if args.cuda_graphs:
            counts = graphs.COUNTS.since(before)
            recorded = f"warm-up recorded {counts['graphs_recorded']} graphs in {counts['graph_recording_s']:.1f} s"
            note = "; ".join(x for x in [note, recorded] if x)
            print(recorded)

    rows, saved = [], 0
    for B in batch_sizes:
        if not args.no_save:  # the previous batch size's rows, saved as they finish (a killed run keeps them)
            append_rows("e2e", FIELDS, rows[saved:])
            saved = len(rows)
        prompts = all_prompts[:B]
        base = dict(key, target=target_name, draft="", batch=B, max_new_tokens=max_new, note=note,
                    dtype=str(dtype).removeprefix("torch.") if synthetic else "float32", compiled=compiled)
        # The baseline runs even when not asked for: every speedup is relative to it, and it is the known
        # continuation of the synthetic drafter.
        with progress(f"B={B} target-only", device):
            ref_out, ref = autoregressive_generate_batch(prompts, target, return_stats=True, **run_kw)
        base_tps = ref.tokens_per_s
        if "target_only_ours" in methods:
            rows.append(noted(dict(base, method="target_only_ours", status="measured", acceptance_kind="none",
                                   speedup=1.0, **stats_fields(ref, B)), ref))  # fmt: skip
        if "target_only_sync_read" in methods:
            rows.append(sync_read_row(prompts, target, run_kw, ref_out, base_tps, base, B, device))
        if "hf_generate" in methods:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out, wall = hf_generate(target, prompts, max_new, eos, pad, device)
            n = sum(len(o) for o in out)
            rows.append(dict(base, method="hf_generate", status="measured", acceptance_kind="none",
                             generated_tokens=n, wall_s=wall, tokens_per_s=n / wall, row_ms_per_token=1e3 * wall * B / n,
                             speedup=(n / wall) / base_tps, matches_target_only=out == ref_out,
                             peak_memory_bytes=torch.cuda.max_memory_allocated(device) if gpu else "",
                             peak_memory_kind="cuda_max_allocated" if gpu else ""))  # fmt: skip
        if "hf_assisted" in methods:
            g = next((x for x in gammas if x != "auto"), 3)
            kwargs = ({"assistant_model": draft_model} if draft_model is not None
                      else {"prompt_lookup_num_tokens": g})  # fmt: skip
            how = "assistant_model=draft" if draft_model is not None else f"prompt_lookup_num_tokens={g}"
            row = dict(base, method="hf_assisted", gamma=g, draft=how,
                       acceptance_kind="random-weight draft (HF cannot use synthetic acceptance)" if synthetic
                       else "real")
            try:
                out, wall = hf_generate(target, prompts, max_new, eos, pad, device, **kwargs)
                n = sum(len(o) for o in out)
                row.update(status="measured", generated_tokens=n, wall_s=wall, tokens_per_s=n / wall,
                           row_ms_per_token=1e3 * wall * B / n, speedup=(n / wall) / base_tps,
                           matches_target_only=out == ref_out)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 -- transformers refuses batched assisted generation; record its words
                msg = " ".join(str(exc).split())[:300]
                row.update(status="refused", note="; ".join(x for x in [note, f"{type(exc).__name__}: {msg}"] if x))
                print(f"hf_assisted B={B}: refused: {type(exc).__name__}: {msg}")
            rows.append(row)
        if "speculative_ours" not in methods:
            continue
        known = known_tokens(ref_out, device) if synthetic else None
        for alpha in alphas if synthetic else [None]:
            for g in gammas:
                gc.collect()
                with progress(f"B={B} gamma={g} alpha={alpha}", device):
                    out, _, st = speculative_generate_batch(prompts, drafter(alpha, known, prompts), target, gamma=g,
                                                            collect_stats=not gpu, **run_kw)  # fmt: skip
                split = st.time_split
                if gpu and not args.no_time_split:
                    split = speculative_generate_batch(prompts, drafter(alpha, known, prompts), target, gamma=g,
                                                       collect_stats=True, **run_kw)[2].time_split  # fmt: skip
                speedup = st.tokens_per_s / base_tps
                expected = expected_acceptance(alpha, g) if synthetic else None
                rows.append(noted(dict(base, method="speculative_ours", status="measured", gamma=g,
                                 draft=draft_name, alpha=alpha if synthetic else "", expected_acceptance=expected,
                                 acceptance_kind="synthetic-acceptance" if synthetic else "real",
                                 speedup=speedup, acceptance_rate=st.acceptance_rate,
                                 acceptance_histogram=" ".join(map(str, st.acceptance_histogram)),
                                 matches_target_only=out == ref_out,
                                 goal=e2e_goal(B, alpha, speedup, st.acceptance_rate, expected, sum(st.proposed)) if gpu else "",
                                 **stats_fields(st, B), **split_fields(split)), st))  # fmt: skip

    print(f"{'method':<22}{'B':>4}{'gam':>5}{'alpha':>6}{'tok/s':>9}{'ms/tok/row':>11}{'speedup':>8}{'acc':>6}"
          f"{'tok/fwd':>8}{'non-model':>10}{'match':>7}  histogram / status")  # fmt: skip
    for r in rows:
        if r["status"] != "measured":
            print(f"{r['method']:<22}{r['batch']:>4}{r.get('gamma', ''):>5}{'':>66}  {r['status']}")
            continue

        def f(k, spec, r=r):
            v = r.get(k)
            return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v or "")

        print(f"{r['method']:<22}{r['batch']:>4}{r.get('gamma', '') or '':>5}{f('alpha', '.1f'):>6}"
              f"{f('tokens_per_s', '.1f'):>9}{f('row_ms_per_token', '.1f'):>11}{f('speedup', '.2f'):>8}"
              f"{f('acceptance_rate', '.2f'):>6}{f('tokens_per_target_forward', '.2f'):>8}"
              f"{f('non_model_frac', '.1%'):>10}{r.get('matches_target_only', '')!s:>7}  "
              f"{r.get('acceptance_histogram', '')} {r.get('goal', '')}")  # fmt: skip
    for r in rows:
        if r["method"] == "speculative_ours" and r.get("draft_s") is not None:
            print(f"time split B={r['batch']} gamma={r['gamma']} alpha={r.get('alpha')}: draft {r['draft_s']:.3f}s "
                  f"verify {r['verify_s']:.3f}s sampling {r['sampling_s']:.3f}s bookkeeping {r['bookkeeping_s']:.3f}s"
                  f" -> non-model {r['non_model_frac']:.1%}")  # fmt: skip
    if not gpu:
        print("GPU goals NOT measured: no CUDA device; these are CPU rows"
              + (" with synthetic acceptance (random-weight models)." if synthetic else " with real acceptance."))
    if not args.no_save:
        path = append_rows("e2e", FIELDS, rows[saved:])
        print(f"appended {len(rows)} rows to {os.path.relpath(path)} (each batch size's as it finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
