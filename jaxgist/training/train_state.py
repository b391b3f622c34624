"""The contrastive train step and everything needed to build it from a config.

    setup = train.build(config, mesh)                 # model, optimizer, shardings, jitted step
    state = setup.init_state(model)                   # sharded TrainState
    state, metrics = setup.step(state, batch)         # batch: {"image", "ids"} global arrays

``build(config, mesh)`` needs no parameters (only their shapes), so the same function gives the
step that ahead-of-time compilation for a pod lowers with abstract inputs
(``setup.step.lower(setup.abstract_state, setup.abstract_batch(...))``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxgist.training import losses
from jaxgist.training import optim
from jaxgist.training import parallel
from jaxgist.models import clip
from jaxgist.models.clip import model as clip_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps done (micro-steps when accumulating)
    params: nnx.State
    opt_state: Any

    def as_dict(self) -> dict[str, Any]:
        """The checkpointed form."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    @classmethod
    def from_dict(cls, d) -> "TrainState":
        return cls(step=d["step"], params=d["params"], opt_state=d["opt_state"])


def make_step_fn(graphdef, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                 accumulate_steps: int = 1, activations: NamedSharding | None = None) -> Callable:
    """The pure train step ``(state, batch) -> (state, metrics)`` for a CLIP ``graphdef``.

    Loss: CLIP's symmetric cross-entropy over the whole (global) batch.
    Metrics: loss, grad_norm, lr, logit_scale (exp, after clamping) and in-batch retrieval top-1.
    ``activations``: the batch sharding every transformer block's input keeps
    (``clip_model.activation_sharding``).
    """

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        with clip_model.activation_sharding(activations):
            logits_per_image, _ = model(batch["image"], batch["ids"])
        loss = losses.clip_loss(logits_per_image)
        return loss, (logits_per_image, model.scale())

    def step_fn(state: TrainState, batch):
        (loss, (logits, scale)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state.step // accumulate_steps),
            "logit_scale": scale,
            **losses.retrieval_accuracy(logits),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step_fn


@dataclasses.dataclass
class Setup:
    """What ``build`` returns: the model's structure, the optimizer and the jitted step."""

    config: Any
    mesh: Mesh
    model_config: clip.CLIPConfig
    graphdef: Any
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    state_shardings: TrainState
    abstract_state: TrainState  # ShapeDtypeStructs carrying the shardings
    step: Any  # jax.jit-wrapped (state, batch) -> (state, metrics), state donated
    image_size: int
    context_length: int

    def init_state(self, model: clip.CLIP) -> TrainState:
        """A sharded TrainState from ``model``'s parameters (pretrained or freshly initialized)."""
        if model.config != self.model_config:
            raise ValueError(f"the model's config {model.config} differs from the config the step was built "
                             f"for {self.model_config}")
        _, params = nnx.split(model, nnx.Param)
        # a copy: the step donates its state, and the caller's model must stay usable
        params = jax.device_put(params, self.state_shardings.params, may_alias=False)
        opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings.step)
        return TrainState(step=step, params=params, opt_state=opt_state)

    def abstract_batch(self, global_batch: int, text_length: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        sharding = parallel.batch_sharding(self.mesh)
        s, length = self.image_size, text_length or self.context_length
        return {"image": jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.float32, sharding=sharding),
                "ids": jax.ShapeDtypeStruct((global_batch, length), jnp.int32, sharding=sharding)}

    def model(self, state: TrainState) -> clip.CLIP:
        """The CLIP whose parameters are ``state.params`` (shares their arrays)."""
        return nnx.merge(self.graphdef, state.params)


def build(config, mesh: Mesh, total_steps: int, *, model_cfg: clip.CLIPConfig | None = None) -> Setup:
    """Optimizer, shardings and the jitted step for ``config`` (its ``model``, ``optim`` and
    ``sharding`` sections) on ``mesh``. Only shapes are used: no parameters are created.

    ``total_steps`` (train steps) sets the length of decaying learning-rate schedules.
    """
    cfg = model_cfg or clip.config_from_model_config(config.model)
    abstract_model = clip.abstract(cfg)
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    accumulate = int(config.optim.get("accumulate_steps", 1))
    tx, lr_schedule = optim.make(config.optim, abstract_params, max(total_steps // accumulate, 1))
    rules = parallel.check_rules(config.get("sharding", {}).get("rules", parallel.DEFAULT_RULES))

    param_shardings = parallel.tree_shardings(abstract_params, clip_model.logical_axes, rules, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = parallel.replicated(mesh)
    opt_shardings = _follow_params(abstract_opt, param_shardings, replicated)
    shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
    abstract_state = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params=_with_shardings(abstract_params, param_shardings),
        opt_state=_with_shardings(abstract_opt, opt_shardings),
    )
    batch_sharding = parallel.batch_sharding(mesh)
    # with FSDP, keep activations split by batch (replicated weights need no constraint)
    sharded_params = parallel.sharded_count(param_shardings)[0] > 0
    step = jax.jit(
        make_step_fn(graphdef, tx, lr_schedule, accumulate, activations=batch_sharding if sharded_params else None),
        in_shardings=(shardings, {"image": batch_sharding, "ids": batch_sharding}),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )
    return Setup(config=config, mesh=mesh, model_config=cfg, graphdef=graphdef, tx=tx, lr_schedule=lr_schedule,
                 state_shardings=shardings, abstract_state=abstract_state, step=step,
                 image_size=cfg.vision.image_size, context_length=cfg.text.context_length)


def _follow_params(opt_state, param_shardings, default: NamedSharding):
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path and has its shape
    (Adam's moments, accumulated gradients) is placed like that parameter; the rest (counters)
    replicated."""
    by_name = {optim.path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))}

    def one(path, leaf):
        parts = optim.path_name(path).split(".")
        for i in range(len(parts)):
            sharding = by_name.get(".".join(parts[i:]))
            if sharding is not None:
                return sharding if len(sharding.spec) <= leaf.ndim else default
        return default

    return jax.tree_util.tree_map_with_path(one, opt_state)


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def host_metrics(metrics) -> dict[str, float]:
    """Device metrics -> Python floats (blocks until the step is done)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def is_finite(metrics: dict[str, float]) -> bool:
    return bool(np.isfinite(metrics["loss"]))
