"""torchvision's ResNet-18/34/50/101/152 (v1.5) in Flax NNX, with torchvision's and HF's weights.

    from jaxgist.models import resnet
    model = resnet.load("resnet50")                      # torchvision's IMAGENET1K_V2 weights (downloaded once)
    model = resnet.load("microsoft/resnet-50")           # or an HF hub name, HF directory, .pth/.safetensors file
    model = resnet.load("ckpt.pth", num_classes=200, reset_head=True)   # the backbone, a fresh 200-class fc
    model = resnet.create("resnet18", num_classes=10, seed=0)           # random init, torchvision's
    logits = model(pixels)                               # [B, H, W, 3] ImageNet-normalized -> [B, classes]
    feats = model.features(pixels)                       # [B, model.feature_dim] pooled, before fc
    model.train(); model.eval()                          # BatchNorm: batch statistics / running ones
    sd = resnet.to_torchvision_state_dict(model)         # numpy, torchvision's keys and layouts
"""

from jaxgist.models.layers import set_batchnorm_groups
from jaxgist.models.resnet.model import (
    PRESETS,
    ResNet,
    ResNetConfig,
    abstract,
    create,
    logical_axes,
    resolve_config,
)
from jaxgist.models.resnet.weights import (
    TORCHVISION_WEIGHTS,
    CheckpointMismatchError,
    config_from_hf,
    config_from_torchvision,
    from_hf_state_dict,
    from_torchvision_state_dict,
    load,
    to_torchvision_state_dict,
)

__all__ = [
    "PRESETS", "ResNet", "ResNetConfig", "abstract", "create", "logical_axes", "resolve_config", "set_batchnorm_groups",
    "TORCHVISION_WEIGHTS", "CheckpointMismatchError", "config_from_hf", "config_from_torchvision", "from_hf_state_dict",
    "from_torchvision_state_dict", "load", "to_torchvision_state_dict",
]
