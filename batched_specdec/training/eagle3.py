"""An EAGLE-3 head trained here (``python -m batched_specdec.training --kind eagle3``): built for a target, started
from the target's own weights, and saved in the public EAGLE-3 layout (:mod:`batched_specdec.drafting.eagle`), so
vLLM and SGLang load it as they load heads trained by the EAGLE authors or SpecForge, and this library loads theirs.

The head reads the inputs of three target layers (the public default ``(2, L // 2, L - 3)``), fused by ``fc``;
its draft vocabulary is the training data's most frequent ids (``--vocab-subset``), mapped to the target's by
``d2t``. Training is the feature draft's (:mod:`batched_specdec.training.feature`: the target's own generations,
training-time test over ``--unroll`` positions), with the KL term alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from batched_specdec.drafting.eagle import CONFIG_FILE, EAGLE3_ARCHITECTURES, EagleDraft, default_feature_layers
from batched_specdec.model_info import text_config

WEIGHTS_FILE = "model.safetensors"


def build_eagle3_draft(target, vocab_ids: Tensor, feature_layers: tuple[int, ...] | None = None) -> EagleDraft:
    """An EAGLE-3 head for ``target`` over the draft vocabulary ``vocab_ids`` ``(K,)``, started from the target:
    its layer is the target's last one reading ``h`` (the embedding half of ``q``/``k``/``v`` zero), ``fc`` passes
    the last of the three layers' features through, ``norm`` and ``lm_head`` are the target's final norm and the
    output-head rows of ``vocab_ids``."""
    from batched_specdec.training.save import draft_config_from_target

    cfg = text_config(target)
    layers = feature_layers or default_feature_layers(int(cfg.num_hidden_layers))
    config = draft_config_from_target(cfg, 1)
    draft = EagleDraft(config, target, layout="eagle3", feature_layers=layers,
                       vocab_ids=torch.as_tensor(vocab_ids, dtype=torch.int64).cpu())
    source = target.get_decoder().layers[-1]
    layer = draft.model.layers[0]
    width = int(config.hidden_size)
    with torch.no_grad():
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
                own = source.get_submodule(name).weight
                module.weight.copy_(torch.cat([torch.zeros_like(own), own], dim=1))
                if module.bias is not None:
                    module.bias.copy_(source.get_submodule(name).bias)
        for name in ("self_attn.o_proj", "mlp", "post_attention_layernorm", "input_layernorm"):
            layer.get_submodule(name).load_state_dict(source.get_submodule(name).state_dict())
        draft.fc.weight.zero_()
        draft.fc.weight[:, 2 * width:].copy_(torch.eye(width))
        draft.norm.weight.copy_(target.get_decoder().norm.weight)
        draft.lm_head.weight.copy_(target.get_output_embeddings().weight[draft.vocab_ids])
    return draft


def save_eagle3(draft: EagleDraft, path: str | Path, *, storage_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``draft`` to ``path`` in the public EAGLE-3 layout: ``config.json`` (``LlamaForCausalLMEagle3``,
    ``draft_vocab_size``, ``target_hidden_size``, the layer ids under ``eagle_config``) and ``model.safetensors``
    (``fc``, ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``; float tensors in ``storage_dtype``). The
    embedding is the target's and is not written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in draft.state_dict().items():
        if key.startswith("model.layers.0."):
            key = "midlayer." + key.removeprefix("model.layers.0.")
        elif key.startswith("model.") or key == "vocab_ids":
            continue
        tensors[key] = value.detach().to("cpu", storage_dtype).contiguous()
    ids = draft.vocab_ids.cpu()
    vocab = int(draft.config.vocab_size)
    tensors["d2t"] = (ids - torch.arange(len(ids))).contiguous()
    tensors["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill_(0, ids, True)
    save_file(tensors, str(path / WEIGHTS_FILE))
    config = draft.config.to_dict()
    config.update(architectures=[EAGLE3_ARCHITECTURES[0]], num_hidden_layers=1, draft_vocab_size=len(ids),
                  target_hidden_size=draft.feature_size // 3, tie_word_embeddings=False,
                  eagle_config={"eagle_aux_hidden_state_layer_ids": list(draft.feature_layers),
                                "use_aux_hidden_state": True})
    config["torch_dtype"] = config["dtype"] = str(storage_dtype).removeprefix("torch.")
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str) + "\n")
    return path
