"""RoBERTa (HF's ``RobertaModel`` with its pooler) in Flax NNX: ``create``, ``load``, ``save_hf``.

    from jaxgist.models import roberta
    model = roberta.load("roberta-base")               # HF hub name, HF directory or state-dict file
    model = roberta.create("roberta-base", seed=0)     # random init (HF's)
    hidden, pooled = model(ids, attention_mask)        # [B, L] -> [B, L, D], [B, D] (tanh pooler)
    roberta.save_hf(model, "out/")                     # transformers.RobertaModel.from_pretrained("out/")
"""

from jaxgist.models.conversion import CheckpointMismatchError
from jaxgist.models.roberta.model import (
    PRESETS,
    Roberta,
    RobertaConfig,
    abstract,
    create,
    logical_axes,
    position_ids,
    resolve_config,
)
from jaxgist.models.roberta.weights import (
    config_from_hf,
    config_to_hf,
    from_hf_state_dict,
    load,
    save_hf,
    to_hf_state_dict,
)

__all__ = [
    "CheckpointMismatchError", "PRESETS", "Roberta", "RobertaConfig", "abstract", "config_from_hf", "config_to_hf",
    "create", "from_hf_state_dict", "load", "logical_axes", "position_ids", "resolve_config", "save_hf",
    "to_hf_state_dict",
]
