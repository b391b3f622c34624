"""Public CLIP API: ``create`` (random init), ``load`` (pretrained), ``save_hf``, and the model.

    from jaxgist.models import clip
    model = clip.load("ViT-B/32")                  # OpenAI/open_clip name, hub name, HF directory or OpenAI .pt
    img = model.encode_image(pixels)               # [B, H, W, 3] normalized -> [B, E]
    txt = model.encode_text(ids)                   # [B, L] ids -> [B, E]
    logits_per_image, logits_per_text = model(pixels, ids)
    clip.save_hf(model, "out_dir")                 # loadable by transformers.CLIPModel
"""

from jaxgist.models.clip.model import (  # noqa: F401
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
    text_only,
)
from jaxgist.models.clip.pretrained import PRETRAINED  # noqa: F401
from jaxgist.models.clip.resnet import ResNetConfig  # noqa: F401
from jaxgist.models.clip.weights import (  # noqa: F401
    OPENAI_HUB_NAMES,
    CheckpointMismatchError,
    UnknownActivation,
    config_from_hf,
    config_from_openai,
    config_to_hf,
    from_hf_state_dict,
    load,
    openai_to_hf,
    read_config,
    save_hf,
    to_hf_state_dict,
)


def default_model_config(init: str = "ViT-B/32"):
    """A job config's ``model`` section: ``init`` (OpenAI or open_clip name, hub name, HF directory or
    .pt; "" for a random ``preset``), ``act`` ("": what the checkpoint says; quick_gelu or gelu forces
    it, and an OpenAI-layout state dict that does not record it needs it), ``tokenizer`` ("": the
    bundled one), ``dtype`` (parameters), ``compute_dtype`` ("": the same), ``remat``."""
    import ml_collections

    return ml_collections.ConfigDict(dict(init=init, preset=None, act="", tokenizer="", dtype="float32",
                                          compute_dtype="", remat=False))


def check_model_config(model_config) -> None:
    """Raises ``ConfigError`` naming the key of a bad ``config.model`` value."""
    from jaxgist.core.config import require

    require(bool(model_config.init) or bool(model_config.preset),
            "config.model.init (pretrained weights) or config.model.preset (random init) must be set")
    for key in ("dtype", "compute_dtype"):
        value = model_config[key]
        require(not value or value in ("float32", "bfloat16", "float16"),
                f"config.model.{key}={value!r} is not one of float32, bfloat16, float16")
    act = model_config.get("act") or ""
    require(act in ("", "quick_gelu", "gelu"), f"config.model.act={act!r} is not one of '', quick_gelu, gelu")


def _numerics(model_config):
    import jax.numpy as jnp

    get = model_config.get
    dtype = jnp.dtype(get("dtype") or "float32")
    compute = jnp.dtype(get("compute_dtype") or dtype)
    return dtype, compute, bool(get("remat") or False)


def config_from_model_config(model_config) -> CLIPConfig:
    """The CLIPConfig a job's ``config.model`` describes. With ``init`` set, the checkpoint's config
    decides the architecture (``read_config``: no weights are loaded where a config file or the
    published sizes tell it); otherwise ``preset`` (a name or a dict of fields)."""
    dtype, compute, remat = _numerics(model_config)
    if model_config.get("init"):
        return read_config(model_config.get("init"), dtype=dtype, compute_dtype=compute, remat=remat,
                           act=model_config.get("act") or None)
    preset = model_config.get("preset")
    if preset is None:
        raise ValueError("model config needs 'init' (pretrained weights) or 'preset' (random init)")
    if hasattr(preset, "to_dict"):
        preset = preset.to_dict()
    return resolve_config(preset, param_dtype=dtype, dtype=compute, remat=remat)


def abstract_from_config(model_config) -> CLIP:
    """``config.model``'s CLIP with placeholder parameters (shapes and dtypes only)."""
    return abstract(config_from_model_config(model_config))


def from_config(model_config, *, seed: int = 0) -> CLIP:
    """The model a job config asks for: ``init`` (a name, HF directory or .pt) if set, else a random
    ``preset`` (a preset name or a dict of CLIPConfig fields). ``dtype``/``compute_dtype``/``remat``
    are optional keys."""
    dtype, compute, remat = _numerics(model_config)
    if model_config.get("init"):
        return load(model_config.get("init"), dtype=dtype, compute_dtype=compute, remat=remat,
                    act=model_config.get("act") or None)
    return create(config_from_model_config(model_config), seed=seed)
