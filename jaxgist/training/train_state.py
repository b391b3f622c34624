"""The train state of one or several named models, laid out over a mesh, and the optimizer update.

    layout = train_state.layout({"clip": abstract_clip}, {"clip": tx}, mesh, rules, {"clip": axes_fn})
    state = layout.init({"clip": model})           # sharded TrainState (a copy: the step donates it)
    model = layout.merge(state, "clip")            # an nnx module sharing the state's arrays
    params, rest = layout.split(state, "clip")     # trainable parameters / every other variable
    model = layout.module("clip", params, rest)    # inside a loss function being differentiated
    state = layout.apply_gradients(state, {"clip": grads}, rest={"clip": new_rest})
    state = state.replace(models={**state.models, "ema": ema_state})   # a model without optimizer, e.g. EMA

A ``TrainState`` keeps the whole ``nnx.State`` of every model (parameters, batch statistics, EMA
copies: whatever variables the module has) and one optimizer state per *trained* model; models
without an optimizer (a frozen teacher, a CLIP that gives text targets) ride along unchanged. Every
array is placed by its model's logical axes and the sharding rules, optimizer state like the parameter
it belongs to. A method writes its step as a function of (state, batch) with these helpers; the loop
(``training.loop``) and checkpoints (``training.checkpoint``) only see the TrainState.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxgist.training import optim, parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps done (micro-steps when accumulating)
    models: dict[str, nnx.State]  # name -> every variable of that model
    opt_states: dict[str, Any]  # name -> optimizer state, for trained models

    def _only(self) -> str:
        if len(self.models) != 1:
            raise ValueError(f"this state holds models {sorted(self.models)}: name one")
        return next(iter(self.models))

    @property
    def params(self) -> nnx.State:
        """The trainable parameters of the state's only model."""
        return nnx.filter_state(self.models[self._only()], nnx.Param)

    @property
    def opt_state(self) -> Any:
        """The optimizer state of the state's only model."""
        return self.opt_states[self._only()]

    def as_dict(self) -> dict[str, Any]:
        """The checkpointed form."""
        return {"step": self.step, "models": dict(self.models), "opt_states": dict(self.opt_states)}

    @classmethod
    def from_dict(cls, d) -> "TrainState":
        return cls(step=d["step"], models=dict(d["models"]), opt_states=dict(d["opt_states"]))


def split_params(model_state: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trainable parameters, every other variable) of one model's state."""
    return nnx.split_state(model_state, nnx.Param, ...)


@dataclasses.dataclass
class Layout:
    """What ``layout`` returns: each model's structure and optimizer, and the state's placement."""

    mesh: Mesh
    graphdefs: dict[str, Any]
    txs: dict[str, optax.GradientTransformation]
    shardings: TrainState  # NamedShardings
    abstract: TrainState  # ShapeDtypeStructs carrying the shardings

    def init(self, models: Mapping[str, nnx.Module]) -> TrainState:
        """A sharded TrainState from live ``models`` (pretrained or freshly initialized); their arrays
        are copied, so the caller's modules stay usable after a donating step."""
        missing = sorted(set(self.graphdefs) - set(models))
        extra = sorted(set(models) - set(self.graphdefs))
        if missing or extra:
            raise ValueError(f"models {sorted(models)} do not match the layout's {sorted(self.graphdefs)}")
        states, seen = {}, set()
        for name, model in models.items():
            graphdef, state = nnx.split(model)
            if graphdef != self.graphdefs[name]:
                raise ValueError(f"model {name!r} differs in structure from the one the step was built for")
            placed = jax.device_put(state, self.shardings.models[name], may_alias=False)
            leaves = {id(x) for x in jax.tree.leaves(state)}
            if leaves & seen:  # one module given twice (an EMA starting as the model): buffers of its own,
                # since the step donates every model's arrays
                placed = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.shardings.models[name])(placed)
            seen |= leaves
            states[name] = placed
        opt_states = {name: jax.jit(tx.init, out_shardings=self.shardings.opt_states[name])(
            split_params(states[name])[0]) for name, tx in self.txs.items()}
        step = jax.device_put(jnp.zeros((), jnp.int32), self.shardings.step)
        return TrainState(step=step, models=states, opt_states=opt_states)

    def merge(self, state: TrainState, name: str, model_state: nnx.State | None = None) -> nnx.Module:
        """Model ``name`` of ``state`` (or with ``model_state``) as an nnx module sharing its arrays."""
        return nnx.merge(self.graphdefs[name], state.models[name] if model_state is None else model_state)

    def module(self, name: str, params: nnx.State, rest: nnx.State) -> nnx.Module:
        """Model ``name`` from its parameters and other variables, with fresh variables: what a loss
        function being differentiated builds (its forward pass may update batch statistics, which it
        then returns with ``nnx.state(module, nnx.Not(nnx.Param))``)."""
        return nnx.merge(self.graphdefs[name], params, rest, copy=True)

    def split(self, state: TrainState, name: str) -> tuple[nnx.State, nnx.State]:
        """(trainable parameters, other variables) of model ``name``."""
        return split_params(state.models[name])

    def apply_gradients(self, state: TrainState, grads: Mapping[str, nnx.State],
                        rest: Mapping[str, nnx.State] | None = None) -> TrainState:
        """One optimizer update of every trained model from its ``grads`` (over its parameters);
        ``rest`` replaces a model's non-parameter variables (e.g. batch statistics the forward pass
        updated). Other models keep their state (set one, e.g. an EMA copy, with
        ``state.replace(models={**state.models, "ema": new})``). Returns the state one step later."""
        unknown = sorted(set(grads) - set(self.txs))
        if unknown:
            raise ValueError(f"gradients for {unknown}, which have no optimizer; trained models: {sorted(self.txs)}")
        models, opt_states = dict(state.models), dict(state.opt_states)
        for name, g in grads.items():
            params, other = split_params(state.models[name])
            updates, opt_states[name] = self.txs[name].update(g, state.opt_states[name], params)
            params = optax.apply_updates(params, updates)
            if rest is not None and name in rest:
                other = rest[name]
            models[name] = nnx.merge_state(params, other)
        for name, other in (rest or {}).items():
            if name not in grads:
                models[name] = nnx.merge_state(split_params(state.models[name])[0], other)
        return TrainState(step=state.step + 1, models=models, opt_states=opt_states)


def layout(abstract_models: Mapping[str, nnx.Module], txs: Mapping[str, optax.GradientTransformation], mesh: Mesh,
           rules, logical_axes: Mapping[str, Callable[[tuple], tuple]]) -> Layout:
    """The placement of a TrainState over ``mesh`` from abstract models (``nnx.eval_shape``: no
    arrays are created). ``txs`` holds the optimizer of each trained model (a subset of the models);
    ``logical_axes[name](path)`` gives the logical axis names of each variable of model ``name``."""
    unknown = sorted(set(txs) - set(abstract_models))
    if unknown:
        raise ValueError(f"optimizers for {unknown}, which are not among the models {sorted(abstract_models)}")
    rules = parallel.check_rules(rules)
    replicated = parallel.replicated(mesh)
    graphdefs, model_shardings, abstract_models_out, opt_shardings, abstract_opts = {}, {}, {}, {}, {}
    for name, module in abstract_models.items():
        graphdef, abstract_state = nnx.split(module)
        graphdefs[name] = graphdef
        shardings = parallel.tree_shardings(abstract_state, logical_axes[name], rules, mesh)
        model_shardings[name] = shardings
        abstract_models_out[name] = with_shardings(abstract_state, shardings)
        if name in txs:
            params, _ = split_params(abstract_state)
            param_shardings, _ = split_params(shardings) if isinstance(shardings, nnx.State) else (shardings, None)
            abstract_opt = jax.eval_shape(txs[name].init, params)
            opt_shardings[name] = follow_params(abstract_opt, params, param_shardings, replicated)
            abstract_opts[name] = with_shardings(abstract_opt, opt_shardings[name])
    shardings = TrainState(step=replicated, models=model_shardings, opt_states=opt_shardings)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), models=abstract_models_out,
                          opt_states=abstract_opts)
    return Layout(mesh=mesh, graphdefs=graphdefs, txs=dict(txs), shardings=shardings, abstract=abstract)


def follow_params(opt_state, params, param_shardings, default: NamedSharding):
    """Shardings for optimizer state: a leaf whose path ends with a parameter's path and that has that
    parameter's shape (Adam's moments, accumulated gradients) is placed like the parameter; every
    other leaf (counters, factored statistics, per-row scales) is replicated."""
    is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
    shapes = {optim.path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    by_name = {optim.path_name(p): s for p, s in jax.tree_util.tree_leaves_with_path(param_shardings,
                                                                                      is_leaf=is_sharding)}

    def one(path, leaf):
        parts = optim.path_name(path).split(".")
        for i in range(len(parts)):
            name = ".".join(parts[i:])
            if name in by_name:
                return by_name[name] if tuple(leaf.shape) == shapes[name] else default
        return default

    return jax.tree_util.tree_map_with_path(one, opt_state)


def with_shardings(tree, shardings):
    """ShapeDtypeStructs of ``tree``'s leaves carrying ``shardings`` (a matching tree)."""
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def host_metrics(metrics) -> dict[str, float]:
    """Device metrics -> Python floats (blocks until the step is done)."""
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def is_finite(metrics: dict[str, float]) -> bool:
    return bool(np.isfinite(metrics["loss"]))
