"""Training a feature draft (``python -m batched_specdec.distill --kind feature``): an EAGLE-style head that reads
the target's own final hidden states (:class:`~batched_specdec.draft_model.FeatureHeadDraft`).

Data are the distillation tool's: the target's own sampled continuations of the training prompts. The features
come from one plain target forward over each training sequence (prompt + continuation, cut to ``--seq-len``),
cached under the run directory next to the data. Pair ``i`` of a sequence is ``(f_i, x_{i+1})``; the draft's output
there is trained towards the target's feature ``f_{i+1}`` (smooth L1, weight ``--feature-weight``) and its subset
distribution towards the target's next-token distribution at ``i + 1`` restricted to the subset
(``KL(p || q)``, ``p = softmax(f_{i+1} W_subset^T)``), as in the EAGLE paper. Input features get Gaussian noise of
``--feature-noise`` times their RMS, so that the head learns to continue from its own, imperfect, predictions.
Only pairs whose next token the target generated carry loss (the prompts' pairs are context).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn


class FeatureTrainSet:
    """Training sequences ``prompt + continuation`` (cut to ``seq_len``), each with the index of its first pair
    that carries loss, and (after :meth:`attach_features`) the target's features of every position."""

    def __init__(self, chunks: list[dict], seq_len: int) -> None:
        self.items: list[tuple[Tensor, int]] = []
        for ch in chunks:
            for i, prompt in enumerate(ch["prompts"]):
                ids = torch.cat([torch.tensor(prompt, dtype=torch.int64), ch["gen"][i]])[:seq_len]
                first = max(len(prompt) - 2, 0)  # pair i predicts x_{i+2}: generated from pair len(prompt) - 2 on
                if len(ids) - 1 > first:
                    self.items.append((ids, first))
        self.features: list[Tensor] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def attach_features(self, target, cache_path: Path, batch_size: int = 16, progress: bool = True) -> None:
        """Compute (or load from ``cache_path``) the target's final hidden states of every sequence, bfloat16."""
        if cache_path.is_file():
            feats = torch.load(cache_path)
            if len(feats) == len(self.items) and all(len(f) == len(x) for f, (x, _) in zip(feats, self.items)):
                self.features = feats
                return
        order = sorted(range(len(self.items)), key=lambda i: -len(self.items[i][0]))
        feats: list[Tensor | None] = [None] * len(self.items)
        device = target.get_input_embeddings().weight.device
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="target features", unit="seq", dynamic_ncols=True)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                group = order[s:s + batch_size]
                width = len(self.items[group[0]][0])
                ids = torch.zeros(len(group), width, dtype=torch.int64)
                for r, i in enumerate(group):  # right padding: causal attention keeps real positions exact
                    ids[r, : len(self.items[i][0])] = self.items[i][0]
                hidden = target.get_decoder()(input_ids=ids.to(device)).last_hidden_state
                for r, i in enumerate(group):
                    feats[i] = hidden[r, : len(self.items[i][0])].to("cpu", torch.bfloat16).clone()
                if bar is not None:
                    bar.update(len(group))
        if bar is not None:
            bar.close()
        print(f"target features of {len(order)} sequences in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        self.features = feats
        tmp = cache_path.with_suffix(".tmp")
        torch.save(feats, tmp)
        tmp.rename(cache_path)

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


def feature_loss(draft, ids: Tensor, feats: Tensor, mask: Tensor, *, feature_weight: float,
                 noise: float) -> Tensor:
    """EAGLE's loss over the masked pairs: ``KL(p || q) + feature_weight * smooth_l1(f_hat, f_next)``."""
    inputs = feats[:, :-1]
    if noise > 0:
        rms = inputs.pow(2).mean(-1, keepdim=True).sqrt()
        inputs = inputs + noise * rms * torch.randn_like(inputs)
    positions = torch.arange(ids.shape[1] - 1, device=ids.device)[None].expand(ids.shape[0], -1)
    predicted = draft.hidden_states(ids[:, 1:], features=inputs, position_ids=positions, use_cache=False)[mask]
    real = feats[:, 1:][mask]
    logq = torch.log_softmax(draft.subset_logits(predicted).float(), dim=-1)
    with torch.no_grad():
        logp = torch.log_softmax(nn.functional.linear(real, draft.head_weight).float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    return kl + feature_weight * nn.functional.smooth_l1_loss(predicted, real)


def build_feature_draft(target, vocab_ids: Tensor, num_layers: int, layer_ids: list[int] | None):
    """A :class:`FeatureHeadDraft` of ``num_layers`` layers at the target's width, its layers copied from target
    layers ``layer_ids`` (None: random), its norm from the target's, ``fc`` starting as embedding + feature."""
    from batched_specdec.draft_model import FeatureHeadDraft, draft_config_from_target, init_from_target

    draft = FeatureHeadDraft(draft_config_from_target(target.config, num_layers), target, vocab_ids)
    init_from_target(draft, target, layer_ids)
    return draft
