"""Public CLIP API: ``create`` (random init), ``load`` (pretrained), ``save_hf``, and the model.

    from jaxgist.models import clip
    model = clip.load("ViT-B/32")                  # hub name, HF directory or OpenAI .pt
    img = model.encode_image(pixels)               # [B, H, W, 3] normalized -> [B, E]
    txt = model.encode_text(ids)                   # [B, L] ids -> [B, E]
    logits_per_image, logits_per_text = model(pixels, ids)
    clip.save_hf(model, "out_dir")                 # loadable by transformers.CLIPModel
"""

from jaxgist.models.clip_model import (  # noqa: F401
    CLIP,
    LOGIT_SCALE_MAX,
    PRESETS,
    CLIPConfig,
    TextConfig,
    VisionConfig,
    abstract,
    create,
    normalize,
    resolve_config,
)
from jaxgist.models.clip_weights import (  # noqa: F401
    OPENAI_HUB_NAMES,
    CheckpointMismatchError,
    config_from_hf,
    config_from_openai,
    config_to_hf,
    from_hf_state_dict,
    load,
    openai_to_hf,
    save_hf,
    to_hf_state_dict,
)


def from_config(model_config, *, seed: int = 0) -> CLIP:
    """The model a job config asks for: ``init`` (hub name, HF directory or .pt) if set, else a random
    ``preset`` (a preset name or a dict of CLIPConfig fields). ``dtype``/``compute_dtype``/``remat``
    are optional keys."""
    import jax.numpy as jnp

    get = model_config.get
    dtype = jnp.dtype(get("dtype") or "float32")
    compute = jnp.dtype(get("compute_dtype") or dtype)
    remat = bool(get("remat") or False)
    if get("init"):
        return load(get("init"), dtype=dtype, compute_dtype=compute, remat=remat)
    preset = get("preset")
    if preset is None:
        raise ValueError("model config needs 'init' (pretrained weights) or 'preset' (random init)")
    if hasattr(preset, "to_dict"):
        preset = preset.to_dict()
    return create(preset, seed=seed, param_dtype=dtype, dtype=compute, remat=remat)
