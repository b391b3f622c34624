"""GPT-2 (HF's ``GPT2LMHeadModel``) in Flax NNX: ``create``, ``load``, ``save_hf``, KV-cache decoding.

    from jaxgist.models import gpt2
    model = gpt2.load("gpt2")                          # HF hub name, HF directory or state-dict file
    model = gpt2.create("gpt2", seed=0)                # random init; tiny: gpt2.create(dict(width=64, ...))
    logits = model(ids)                                # [B, L] -> [B, L, V] float32 (tied LM head)
    logits = model(inputs_embeds=x)                    # [B, L, D], e.g. a caption prefix then tokens
    out = gpt2.decode.greedy(model, prefix)            # jitted, KV cache: tokens [B, 20], scores [B]
    out = gpt2.decode.sample(model, prefix, key)       # 5 samples per prefix: tokens [B, 5, 20]
    gpt2.save_hf(model, "out/")                        # transformers.GPT2LMHeadModel.from_pretrained("out/")
"""

from jaxgist.models.conversion import CheckpointMismatchError
from jaxgist.models.gpt2 import decode
from jaxgist.models.gpt2.model import (
    PRESETS,
    GPT2,
    GPT2Config,
    KVCache,
    abstract,
    create,
    logical_axes,
    resolve_config,
)
from jaxgist.models.gpt2.weights import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    load,
    save_hf,
    to_hf_state_dict,
)

__all__ = [
    "CheckpointMismatchError", "GPT2", "GPT2Config", "KVCache", "PRESETS", "abstract", "config_from_hf",
    "config_to_hf", "create", "decode", "from_hf_state_dict", "load", "logical_axes", "resolve_config", "save_hf",
    "to_hf_state_dict",
]
