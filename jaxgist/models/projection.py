"""GPT4Image's projection heads: a classifier's image feature -> the CLIP text-embedding space. Used
only by the training loss; inference uses the classifier alone.

    proj = projection.ProjectionMLP.for_resnet(2048, 1024, rngs=rngs)  # Linear(no bias)-BN-ReLU-Linear
    proj = projection.ProjectionMLP.for_deit(768, 1024, rngs=rngs)     # Linear-ReLU-Linear
    z = proj(features)                                                 # [B, out] (unnormalized)

As GPT4Image's ``build_mlp`` (hidden width ``2 * out``): ``fc1`` has no bias when a BatchNorm follows
it. Initialization as the reference: both weight matrices from a normal of std ``1024 ** -0.5``
(ResNet) or 0.02 (DeiT; ``trunc_normal_`` truncates at +-2 absolute, which is 64 and 100 standard
deviations: effectively untruncated); biases keep PyTorch's Linear default, uniform in
``+-1/sqrt(fan_in)``. BatchNorm is PyTorch's (``layers.BatchNorm``): batch statistics after
``train()``, running ones after ``eval()``.

Parameter names map to the reference's ``proj_layer.N`` by ``TORCH_NAMES``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgist.models.layers import BatchNorm, Dense


def _torch_bias(key, fan_in: int, size: int, dtype):
    bound = fan_in**-0.5
    return jax.random.uniform(key, (size,), dtype, -bound, bound)


class ProjectionMLP(nnx.Module):
    """``fc1`` (in -> hidden) -> [``bn``] -> ReLU -> ``fc2`` (hidden -> out)."""

    def __init__(self, din: int, hidden: int, dout: int, *, batchnorm: bool, std: float, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        dense = dict(std=std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(din, hidden, use_bias=not batchnorm, **dense)
        if not batchnorm:
            self.fc1.bias[...] = _torch_bias(rngs.params(), din, hidden, param_dtype)
        self.bn = BatchNorm(hidden, param_dtype=param_dtype, use_running_average=True) if batchnorm else None
        self.fc2 = Dense(hidden, dout, **dense)
        self.fc2.bias[...] = _torch_bias(rngs.params(), hidden, dout, param_dtype)

    @classmethod
    def for_resnet(cls, din: int, dout: int = 1024, **kw) -> "ProjectionMLP":
        return cls(din, 2 * dout, dout, batchnorm=True, std=1024**-0.5, **kw)

    @classmethod
    def for_deit(cls, din: int, dout: int = 1024, **kw) -> "ProjectionMLP":
        return cls(din, 2 * dout, dout, batchnorm=False, std=0.02, **kw)

    def __call__(self, x):
        h = self.fc1(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.fc2(jax.nn.relu(h)).astype(jnp.float32)


def torch_names(batchnorm: bool) -> dict[str, str]:
    """Our parameter path -> the reference's ``proj_layer`` key (Flax ``kernel`` is PyTorch's transposed
    ``weight``)."""
    fc2 = "proj_layer.3" if batchnorm else "proj_layer.2"
    names = {"fc1.kernel": "proj_layer.0.weight", "fc2.kernel": f"{fc2}.weight", "fc2.bias": f"{fc2}.bias"}
    if batchnorm:
        names.update({"bn.scale": "proj_layer.1.weight", "bn.bias": "proj_layer.1.bias",
                      "bn.mean": "proj_layer.1.running_mean", "bn.var": "proj_layer.1.running_var"})
    else:
        names["fc1.bias"] = "proj_layer.0.bias"
    return names


def logical_axes(path) -> tuple:
    names = tuple(str(p) for p in path)
    if names and names[-1] == "value":
        names = names[:-1]
    leaf = names[-1]
    if names[-2] == "bn":
        return ("norm",)
    if leaf == "kernel":
        return ("embed", "mlp") if names[-2] == "fc1" else ("mlp", "proj")
    if leaf == "bias":
        return ("mlp",) if names[-2] == "fc1" else ("proj",)
    raise KeyError(f"no logical axes for projection parameter {'.'.join(names)!r}")
