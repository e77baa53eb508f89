"""Training a feature draft (``python -m batched_specdec.training --kind feature``): an EAGLE-style head that reads
the target's own final hidden states (:class:`~batched_specdec.drafting.heads.FeatureHeadDraft`); with ``--kind
eagle3`` an EAGLE-3 head over three target layers' (:mod:`batched_specdec.training.eagle3`), trained the same way.

Data are the distillation tool's: the target's own sampled continuations of the training prompts. The features
come from one plain target forward over each training sequence (prompt + continuation, cut to ``--seq-len``),
cached under the run directory next to the data. Pair ``i`` of a sequence is ``(f_i, x_{i+1})``; the draft's output
there is trained towards the target's feature ``f_{i+1}`` (smooth L1, weight ``--feature-weight``) and its subset
distribution towards the target's next-token distribution at ``i + 1`` restricted to the subset
(``KL(p || q)``, ``p = softmax(f_{i+1} W_subset^T)``), as in the EAGLE paper. Input features get Gaussian noise of
``--feature-noise`` times their RMS, so that the head learns to continue from its own, imperfect, predictions.
Only pairs whose next token the target generated carry loss (the prompts' pairs are context).

An EAGLE-3 head's features are the inputs of its three target layers, fused by its ``fc``; the training set then
keeps those (``3H``) and the final hidden state (``H``, for the teacher distribution) of every position, and the
head's output (before its norm) has no target counterpart, so the loss is the KL term alone.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn


class FeatureTrainSet:
    """Training sequences ``prompt + continuation`` (cut to ``seq_len``), each with the index of its first pair
    that carries loss, and (after :meth:`attach_features`) the target's features of every position."""

    def __init__(self, chunks: list[dict], seq_len: int, exclude: frozenset = frozenset()) -> None:
        self.chunks = chunks
        self.seq_len = seq_len
        self.exclude = exclude  # prompts (id tuples) whose sequences are left out (after their features are cached)
        self.items: list[tuple[Tensor, int]] = []
        self.chunk_of_item: list[int] = []
        self.prompt_of_item: list[tuple] = []
        for c, ch in enumerate(chunks):
            for i, prompt in enumerate(ch["prompts"]):
                ids = torch.cat([torch.tensor(prompt, dtype=torch.int64), ch["gen"][i]])[:seq_len]
                first = max(len(prompt) - 2, 0)  # pair i predicts x_{i+2}: generated from pair len(prompt) - 2 on
                if len(ids) - 1 > first:
                    self.items.append((ids, first))
                    self.chunk_of_item.append(c)
                    self.prompt_of_item.append(tuple(prompt))
        self.features: list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def attach_features(self, target, cache_dir: Path, batch_size: int = 16, progress: bool = True,
                        layers: tuple[int, ...] | None = None) -> None:
        """Compute the target's features (bfloat16) of every sequence, or load them from ``cache_dir``, where each
        data chunk's are kept under a hash of its content (so new chunks add, old ones are reused): the final hidden
        states ``(T, H)``, or with ``layers`` the inputs of those decoder layers and the final hidden states,
        concatenated ``(T, (len(layers) + 1) H)``."""
        cache_dir.mkdir(parents=True, exist_ok=True)
        by_chunk: dict[int, list[int]] = {}
        for i, c in enumerate(self.chunk_of_item):
            by_chunk.setdefault(c, []).append(i)
        self.features = [None] * len(self.items)
        missing = []
        for c, items in by_chunk.items():
            dtype = str(target.dtype).removeprefix("torch.")  # features of another precision are other features
            tag = "" if layers is None else "-layers" + "_".join(str(i) for i in layers)
            path = cache_dir / f"{_chunk_hash(self.chunks[c])}-len{self.seq_len}-{dtype}{tag}.pt"
            if path.is_file():
                for i, f in zip(items, torch.load(path)):
                    self.features[i] = f
            else:
                missing.append((path, items))
        todo = sum(len(items) for _, items in missing)
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=todo, desc="target features", unit="seq", dynamic_ncols=True)
        t0 = time.perf_counter()
        for path, items in missing:
            self._compute(target, items, batch_size, bar, layers)
            tmp = path.with_suffix(".tmp")
            torch.save([self.features[i] for i in items], tmp)
            tmp.rename(path)
        if bar is not None:
            bar.close()
        if todo:
            print(f"target features of {todo} sequences in {time.perf_counter() - t0:.0f} s "
                  f"({len(self.items) - todo} cached)", file=sys.stderr)
        keep = [i for i, p in enumerate(self.prompt_of_item) if p not in self.exclude]
        self.items = [self.items[i] for i in keep]
        self.features = [self.features[i] for i in keep]

    @torch.inference_mode()
    def _compute(self, target, items: list[int], batch_size: int, bar, layers) -> None:
        order = sorted(items, key=lambda i: -len(self.items[i][0]))
        device = target.get_input_embeddings().weight.device
        for s in range(0, len(order), batch_size):
            group = order[s:s + batch_size]
            ids = torch.zeros(len(group), len(self.items[group[0]][0]), dtype=torch.int64)
            for r, i in enumerate(group):  # right padding: causal attention keeps real positions exact
                ids[r, : len(self.items[i][0])] = self.items[i][0]
            out = target.get_decoder()(input_ids=ids.to(device), output_hidden_states=layers is not None)
            hidden = out.last_hidden_state
            if layers is not None:
                hidden = torch.cat([out.hidden_states[i] for i in layers] + [hidden], dim=-1)
            for r, i in enumerate(group):
                self.features[i] = hidden[r, : len(self.items[i][0])].to("cpu", torch.bfloat16).clone()
            if bar is not None:
                bar.update(len(group))

    def batch(self, indices: list[int], device) -> tuple[Tensor, ...]:
        """``(ids (N, T), features (N, T, H), loss mask over pairs (N, T - 1))``, right-padded."""
        width = max(len(self.items[i][0]) for i in indices)
        hidden = self.features[indices[0]].shape[-1]
        ids = torch.zeros(len(indices), width, dtype=torch.int64)
        feats = torch.zeros(len(indices), width, hidden)
        mask = torch.zeros(len(indices), width - 1, dtype=torch.bool)
        for r, i in enumerate(indices):
            x, first = self.items[i]
            ids[r, : len(x)] = x
            feats[r, : len(x)] = self.features[i].float()
            mask[r, first: len(x) - 1] = True
        return ids.to(device), feats.to(device), mask.to(device)


def _chunk_hash(chunk: dict) -> str:
    h = hashlib.sha256(json.dumps(chunk["prompts"]).encode())
    h.update(chunk["gen"].numpy().tobytes())
    return h.hexdigest()[:16]


def feature_loss(draft, ids: Tensor, feats: Tensor, mask: Tensor, *, teacher: Tensor, feature_weight: float,
                 noise: float, unroll: int = 1) -> Tensor:
    """EAGLE's loss over the masked pairs, ``KL(p || q) + feature_weight * smooth_l1(f_hat, f_next)``, averaged
    over ``unroll`` draft positions. ``feats`` ``(N, T, F [+ H])``: the features the head reads
    (``draft.feature_size`` wide) and, for a head whose features are not the final hidden states, those after
    them; ``p`` is the target's distribution over the subset, ``softmax(f_final teacher^T)`` with ``teacher`` the
    target's output-head rows of the subset ``(K, H)``.

    Pass 1 feeds the target's (noisy) features. Pass ``m > 1`` ("training-time test", as EAGLE-3) feeds at pair
    ``i`` the feature pass ``m - 1`` predicted at pair ``i - 1``, as the ``m``-th draft of a step does, and attends
    as that draft would: to real pairs up to ``i - m + 1`` and to the passes' own pairs after them
    (:func:`unrolled_mask`)."""
    inputs = feats[:, :-1, : draft.feature_size]
    if noise > 0:
        rms = inputs.pow(2).mean(-1, keepdim=True).sqrt()
        inputs = inputs + noise * rms * torch.randn_like(inputs)
    real = feats[:, 1:, -teacher.shape[-1]:]
    loss = 0.0
    for m, out in enumerate(unrolled_features(draft, ids[:, 1:], inputs, unroll), start=1):
        keep = mask.clone()
        keep[:, : m - 1] = False  # the first m - 1 pairs have no m-th draft
        loss = loss + _pair_loss(draft, out[keep], real[keep], teacher, feature_weight)
    return loss / unroll


def unrolled_features(draft, tokens: Tensor, features: Tensor, passes: int):
    """Yield pass ``m``'s predicted features ``(B, P, H)`` at every pair, ``m = 1 .. passes``, for pairs
    ``(features[:, i], tokens[:, i])``: pass 1 reads ``features``, pass ``m`` the predictions of pass ``m - 1``
    one pair earlier (no gradient through them), each pass recomputed with the earlier ones as its context."""
    rows, pairs = tokens.shape
    positions = torch.arange(pairs, device=tokens.device)[None].expand(rows, -1)
    features = draft.project_features(features)  # the head's width: what its own predictions have
    embeds = [draft.pair_inputs(tokens, features)]
    out = draft.model(inputs_embeds=embeds[0], position_ids=positions, use_cache=False).last_hidden_state
    yield out
    for m in range(2, passes + 1):
        prev = out.detach()  # pass m-1's predictions; pair 0 keeps its real feature
        embeds.append(draft.pair_inputs(tokens, torch.cat([features[:, :1], prev[:, :-1]], dim=1)))
        attn = unrolled_mask(pairs, m, draft.dtype, tokens.device).expand(rows, 1, -1, -1)
        out = draft.model(inputs_embeds=torch.cat(embeds, dim=1), position_ids=positions.repeat(1, m),
                          attention_mask=attn, use_cache=False).last_hidden_state[:, -pairs:]
        yield out


def _pair_loss(draft, predicted: Tensor, real: Tensor, teacher: Tensor, feature_weight: float) -> Tensor:
    logq = torch.log_softmax(draft.subset_logits(predicted).float(), dim=-1)
    with torch.no_grad():
        logp = torch.log_softmax(nn.functional.linear(real, teacher).float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    if not feature_weight:
        return kl
    return kl + feature_weight * nn.functional.smooth_l1_loss(predicted, real)


def unrolled_mask(pairs: int, passes: int, dtype: torch.dtype, device) -> Tensor:
    """``(1, 1, passes * pairs, passes * pairs)`` additive mask of ``passes`` copies of ``pairs`` positions: pass
    ``m`` (0-based) at position ``i`` sees pass 0 at positions ``<= i - m`` and pass ``k`` (``1 <= k <= m``) at
    position ``i - m + k`` only; pass 0 is causal."""
    i = torch.arange(pairs, device=device)
    blocks = []
    for m in range(passes):
        row = []
        for k in range(passes):
            if k == 0:
                allowed = i[None, :] <= i[:, None] - m
            elif k <= m:
                allowed = i[None, :] == i[:, None] - m + k
            else:
                allowed = torch.zeros(pairs, pairs, dtype=torch.bool, device=device)
            row.append(allowed)
        blocks.append(torch.cat(row, dim=1))
    allowed = torch.cat(blocks, dim=0)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[None, None]


def build_feature_draft(target, vocab_ids: Tensor, num_layers: int, layer_ids: list[int] | None):
    """A :class:`FeatureHeadDraft` of ``num_layers`` layers at the target's width, its layers copied from target
    layers ``layer_ids`` (None: random), its norm from the target's, ``fc`` starting as embedding + feature."""
    from batched_specdec.drafting.heads import FeatureHeadDraft
    from batched_specdec.training.save import draft_config_from_target, init_from_target

    draft = FeatureHeadDraft(draft_config_from_target(target.config, num_layers), target, vocab_ids)
    init_from_target(draft, target, layer_ids)
    return draft
