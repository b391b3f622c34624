"""The contrastive CLIP train step (CLIP's symmetric loss over the global batch) and what it needs,
built from a config on the model-agnostic train state (``training.train_state``).

    setup = finetune_step.build(config, mesh, total_steps)   # layout, optimizer, jitted step (no params)
    state = setup.init_state(model)                           # sharded TrainState {"clip": ...}
    state, metrics = setup.step(state, batch)                 # batch: {"image", "ids"} global arrays
    model = setup.model(state)                                # the CLIP of a state

``build`` needs only shapes, so ahead-of-time compilation lowers the same step with abstract inputs
(``setup.step.lower(setup.abstract_state, setup.abstract_batch(global_batch))``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxgist.models import clip, layers
from jaxgist.models.clip import model as clip_model
from jaxgist.training import losses, optim, parallel, train_state

MODEL = "clip"  # the model's name in the train state and its checkpoints


def make_step_fn(layout: train_state.Layout, lr_schedule: optax.Schedule, accumulate_steps: int = 1,
                 activations: NamedSharding | None = None):
    """The pure train step ``(state, batch) -> (state, metrics)``.

    Metrics: loss, grad_norm, lr, logit_scale (exp, after clamping) and in-batch retrieval top-1.
    ``activations``: the batch sharding every transformer block's input keeps
    (``models.layers.activation_sharding``)."""
    def loss_fn(params, rest, batch):
        model = layout.module(MODEL, params, rest)
        model.train()  # a ResNet tower's BatchNorm uses and updates batch statistics, as PyTorch's train()
        with layers.activation_sharding(activations):
            logits_per_image, _ = model(batch["image"], batch["ids"])
        new_rest = nnx.state(model, nnx.Not(nnx.Param))
        return losses.clip_loss(logits_per_image), (logits_per_image, model.scale(), new_rest)

    def step_fn(state: train_state.TrainState, batch):
        params, rest = layout.split(state, MODEL)
        (loss, (logits, scale, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state.step // accumulate_steps),
            "logit_scale": scale,
            **losses.retrieval_accuracy(logits),
        }
        return layout.apply_gradients(state, {MODEL: grads}, rest={MODEL: new_rest}), metrics

    return step_fn


@dataclasses.dataclass
class Setup:
    """What ``build`` returns: the state's layout, the optimizer and the jitted step."""

    config: Any
    mesh: Mesh
    model_config: clip.CLIPConfig
    layout: train_state.Layout
    lr_schedule: optax.Schedule
    step: Any  # jax.jit-wrapped (state, batch) -> (state, metrics), state donated
    image_size: int
    context_length: int

    @property
    def graphdef(self):
        return self.layout.graphdefs[MODEL]

    @property
    def tx(self) -> optax.GradientTransformation:
        return self.layout.txs[MODEL]

    @property
    def state_shardings(self) -> train_state.TrainState:
        return self.layout.shardings

    @property
    def abstract_state(self) -> train_state.TrainState:
        return self.layout.abstract

    @property
    def param_shardings(self) -> nnx.State:
        return train_state.split_params(self.layout.shardings.models[MODEL])[0]

    def init_state(self, model: clip.CLIP) -> train_state.TrainState:
        """A sharded TrainState from ``model`` (pretrained or freshly initialized)."""
        if model.config != self.model_config:
            raise ValueError(f"the model's config {model.config} differs from the config the step was built "
                             f"for {self.model_config}")
        return self.layout.init({MODEL: model})

    def abstract_batch(self, global_batch: int, text_length: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        sharding = parallel.batch_sharding(self.mesh)
        s, length = self.image_size, text_length or self.context_length
        return {"image": jax.ShapeDtypeStruct((global_batch, s, s, 3), jnp.float32, sharding=sharding),
                "ids": jax.ShapeDtypeStruct((global_batch, length), jnp.int32, sharding=sharding)}

    def model(self, state: train_state.TrainState) -> clip.CLIP:
        """The CLIP of ``state`` (shares its arrays)."""
        return self.layout.merge(state, MODEL)


def build(config, mesh: Mesh, total_steps: int, *, model_cfg: clip.CLIPConfig | None = None) -> Setup:
    """Optimizer, layout and the jitted step for ``config`` (its ``model``, ``optim`` and ``sharding``
    sections) on ``mesh``. Only shapes are used: no parameters are created. ``total_steps`` (train
    steps) sets the length of decaying learning-rate schedules."""
    cfg = model_cfg or clip.config_from_model_config(config.model)
    abstract_model = clip.abstract(cfg)
    abstract_params = nnx.state(abstract_model, nnx.Param)
    accumulate = int(config.optim.get("accumulate_steps", 1))
    tx, lr_schedule = optim.make(config.optim, abstract_params, max(total_steps // accumulate, 1))
    rules = config.get("sharding", {}).get("rules", parallel.DEFAULT_RULES)
    layout = train_state.layout({MODEL: abstract_model}, {MODEL: tx}, mesh, rules, {MODEL: clip_model.logical_axes})
    batch_sharding = parallel.batch_sharding(mesh)
    replicated = parallel.replicated(mesh)
    # with FSDP, keep activations split by batch (replicated weights need no constraint)
    sharded_params = parallel.sharded_count(layout.shardings.models[MODEL])[0] > 0
    step = jax.jit(
        make_step_fn(layout, lr_schedule, accumulate, activations=batch_sharding if sharded_params else None),
        in_shardings=(layout.shardings, {"image": batch_sharding, "ids": batch_sharding}),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=(0,),
    )
    return Setup(config=config, mesh=mesh, model_config=cfg, layout=layout, lr_schedule=lr_schedule, step=step,
                 image_size=cfg.vision.image_size, context_length=cfg.text.context_length)
