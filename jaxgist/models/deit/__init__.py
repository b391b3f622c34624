"""DeiT (timm's VisionTransformer with a class token) in Flax NNX: ``create``, ``load``, conversion.

    from jaxgist.models import deit
    model = deit.load("deit_b")                        # facebookresearch's file, an HF hub name/dir, a .pth
    model = deit.load("deit_small", num_classes=200, reset_head=True)   # a fresh head for fine-tuning
    model = deit.create("deit_tiny", num_classes=10, drop_path=0.1, dtype=jnp.bfloat16)
    logits = model(pixels)                             # [B, H, W, 3] ImageNet-normalized -> [B, classes]
    feats = model.features(pixels)                     # [B, D]: the class token after the final LayerNorm
    model.train(); logits = model(pixels, rngs=nnx.Rngs(dropout=step))  # stochastic depth / dropout
    sd = deit.to_timm_state_dict(model)                # timm's names, numpy float32
"""

from jaxgist.models.clip.weights import CheckpointMismatchError
from jaxgist.models.deit.model import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    DeiT,
    DeiTConfig,
    abstract,
    create,
    drop_path,
    dropout,
    logical_axes,
    resolve_config,
)
from jaxgist.models.deit.weights import (
    DEIT_URLS,
    config_from_hf,
    config_from_timm,
    from_hf_state_dict,
    from_timm_state_dict,
    load,
    to_hf_state_dict,
    to_timm_state_dict,
)

__all__ = [
    "CheckpointMismatchError", "DEIT_URLS", "DeiT", "DeiTConfig", "IMAGENET_MEAN", "IMAGENET_STD", "PRESETS",
    "abstract", "config_from_hf", "config_from_timm", "create", "drop_path", "dropout", "from_hf_state_dict",
    "from_timm_state_dict", "load", "logical_axes", "resolve_config", "to_hf_state_dict", "to_timm_state_dict",
]
