"""The end-to-end benchmark's models, prompts and drafters (``bench_e2e.py``).

Synthetic acceptance (``--models toy``, ``--models real-size``, and the default on CUDA): a random-weight Qwen2 pair
(7B-class target and 0.5B-class draft, or toy shapes of the same layout; with ``--draft-head eagle3`` an EAGLE-3-layout
head for the target instead of the draft model, random weights, a 32,000-id draft vocabulary), ragged random prompts,
and :class:`SyntheticAcceptanceDrafter`, which runs the draft's forwards and proposes the known continuation with
probability alpha. Otherwise (the default on CPU): the embedded SmolLM2-135M-Instruct target, its default draft (the
distilled draft when it loads, else the n-gram drafter) and the built-in chat prompts.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from batched_specdec.drafting import Drafter, DraftProposal, FeatureDrafter, ModelDrafter


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
        feature = getattr(draft_model, "kind", None) == "feature"  # a draft head: it reads the target's features
        self.inner = FeatureDrafter(draft_model) if feature else ModelDrafter(draft_model)
        self.uses_target_features, self.feature_layers = self.inner.uses_target_features, self.inner.feature_layers
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

    def observe_features(self, hidden, first_position, rows=None):
        self.inner.observe_features(hidden, first_position, rows)

    def note_target_only_step(self, width=1):
        self.inner.note_target_only_step(width)

    def keep_rows(self, rows):
        self.inner.keep_rows(rows)
        index = rows.to(self.known.device)
        self.prompt_lens = self.prompt_lens.index_select(0, index)
        self.row_prompts = self.row_prompts.index_select(0, index)


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


def load_cpu_models():
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
    eos = resolve_eos(None, target, tokenizer, vocab_size(target))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]  # left padding, masked out
    return target, tokenizer, draft, draft_name, eos, pad


def cpu_prompts(tokenizer, n: int) -> list[list[int]]:
    from batched_specdec.prompts import builtin_prompts, encode_prompts, select_prompts

    return encode_prompts(tokenizer, select_prompts(builtin_prompts(), n))


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (m,), generator=g).tolist() for m in lens]


def known_tokens(outputs: list[list[int]], device) -> torch.Tensor:
    """(B, N) int64 target-only continuations, zero-padded: the synthetic drafter's known tokens."""
    width = max(len(o) for o in outputs)
    return torch.tensor([o + [0] * (width - len(o)) for o in outputs], dtype=torch.int64, device=device)


@dataclasses.dataclass
class E2EModels:
    """What one run decodes with: the target, the draft, their row labels, EOS and pad ids, and the prompts (the
    first ``B`` of them at batch size ``B``)."""

    synthetic: bool  # the random-weight pair with synthetic acceptance
    target: torch.nn.Module
    draft_model: torch.nn.Module | None  # the draft model (None for the n-gram drafter and a draft head)
    draft: Drafter | None  # the drafter of every run without synthetic acceptance
    target_name: str
    draft_name: str
    eos: list[int]
    pad: int | None
    prompts: list[list[int]]
    dtype: str  # the models' dtype, as the rows' ``dtype`` column says it
    seed: int
    head: torch.nn.Module | None = None  # an EAGLE-3-layout head drafting instead of draft_model (--draft-head)

    def drafter(self, alpha: float | None, known: torch.Tensor | None, prompts: list[list[int]]):
        """The drafter of one speculative run: a fresh :class:`SyntheticAcceptanceDrafter` (``alpha``, ``known``
        continuations of ``prompts``), or the shared default drafter."""
        if self.synthetic:
            return SyntheticAcceptanceDrafter(self.head or self.draft_model, known, alpha, prompts, self.seed)
        return self.draft


def random_pair(args: argparse.Namespace, device: torch.device, n_prompts: int) -> E2EModels:
    """The random-weight Qwen2 pair (``--models toy``: toy shapes, vocabulary 512; else 7B/0.5B-class shapes,
    vocabulary 152064) in ``--dtype`` on CUDA (float32 with TF32 matmuls allowed) or float32 on CPU, and
    ``n_prompts`` random prompts with lengths in ``--prompt-len``."""
    gpu = device.type == "cuda"
    toy = args.models == "toy"
    vocab = 512 if toy else 152064
    dtype = getattr(torch, args.dtype) if gpu else torch.float32
    if dtype == torch.float32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    short = {torch.bfloat16: "bf16", torch.float32: "fp32 (TF32 matmuls)" if gpu else "fp32"}[dtype]
    target = random_qwen2("toy-target" if toy else "7b", vocab, dtype, device)
    head = eagle3_head(target, 64 if toy else 32000, args.seed) if args.draft_head == "eagle3" else None
    draft_name = f"Qwen2-{'toy' if toy else '0.5B-class'} config, random weights, {short} (real forwards)"
    if head is not None:
        draft_name = f"EAGLE-3-layout head, {len(head.vocab_ids)}-id draft vocabulary, random weights, {short}"
    return E2EModels(
        synthetic=True, target=target, head=head, draft=None,
        draft_model=None if head is not None else random_qwen2("toy-draft" if toy else "0.5b", vocab, dtype, device),
        target_name=f"Qwen2-{'toy' if toy else '7B-class'} config, random weights, {short}", draft_name=draft_name,
        eos=[], pad=0, prompts=random_prompts(n_prompts, vocab, *args.prompt_len, seed=args.seed),
        dtype=str(dtype).removeprefix("torch."), seed=args.seed,
    )  # fmt: skip


def eagle3_head(target, draft_vocab: int, seed: int):
    """An EAGLE-3-layout head for ``target`` (its default layers, ``draft_vocab`` ids), random weights in the
    target's dtype and device: what an EAGLE-3 draft forward costs, whatever it proposes."""
    from batched_specdec.drafting.eagle import default_feature_layers
    from batched_specdec.training.eagle3 import build_eagle3_draft

    torch.manual_seed(seed)
    layers = target.config.num_hidden_layers  # the toy target has 2: its layers clipped into range
    ids = tuple(min(max(i, 0), layers - 1) for i in default_feature_layers(layers))
    head = build_eagle3_draft(target, torch.arange(draft_vocab), ids)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0.0, 0.02)
    return head.eval().requires_grad_(False)


def embedded_pair(n_prompts: int, seed: int) -> E2EModels:
    """The embedded SmolLM2 target with its default draft (:func:`load_cpu_models`) and ``n_prompts`` built-in chat
    prompts."""
    target, tokenizer, draft, draft_name, eos, pad = load_cpu_models()
    return E2EModels(
        synthetic=False, target=target, draft_model=draft if hasattr(draft, "config") else None, draft=draft,
        target_name="SmolLM2-135M-Instruct (embedded GGUF Q4_1, fp32)", draft_name=draft_name, eos=eos, pad=pad,
        prompts=cpu_prompts(tokenizer, n_prompts), dtype="float32", seed=seed,
    )  # fmt: skip
