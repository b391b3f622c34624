"""The train step: parity with a PyTorch reference step, equal losses across meshes, optimizer options."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxgist.methods import finetune_step
from jaxgist.models import clip
from jaxgist.training import losses, optim, parallel, train_state

TINY = dict(
    vision=dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_dim=64),
    text=dict(context_length=16, vocab_size=99, width=32, layers=2, heads=2, mlp_dim=64, eos_token_id=None),
    embed_dim=16,
)
BATCH = 8


def config(**optim_overrides):
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(init="", preset=TINY, dtype="float32"))
    c.optim = optim.default_config()
    c.optim.update(optim_overrides)
    c.sharding = ml_collections.ConfigDict(dict(rules=parallel.DEFAULT_RULES))
    return c


def batches(n, seed=0, batch=BATCH, size=32, ctx=16, vocab=99):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = np.zeros((batch, ctx), np.int32)
        for row in range(batch):
            length = int(rng.integers(3, ctx + 1))
            ids[row, : length - 1] = rng.integers(3, vocab - 2, size=length - 1)
            ids[row, length - 1] = vocab - 1
        out.append({"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32), "ids": ids})
    return out


def run_steps(c, mesh, data, model=None):
    setup = finetune_step.build(c, mesh, total_steps=len(data), model_cfg=None if model is None else model.config)
    state = setup.init_state(model if model is not None else clip.from_config(c.model, seed=0))
    sharding = parallel.batch_sharding(mesh)
    curve = []
    for b in data:
        state, m = setup.step(state, {k: jax.device_put(v, sharding) for k, v in b.items()})
        curve.append(train_state.host_metrics(m))
    return state, curve


# ---------------------------------------------------------------------------------------------
# PyTorch reference
# ---------------------------------------------------------------------------------------------

def test_one_step_matches_pytorch_adam(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPConfig(
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=99, max_position_embeddings=16, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, hidden_act="quick_gelu", eos_token_id=2),
        projection_dim=16)
    ref = transformers.CLIPModel(hf_cfg)
    with torch.no_grad():
        for p in ref.parameters():
            if p.ndim > 0:
                p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    ours = clip.load(tmp_path)

    # GIST's optimizer with a learning rate large enough for the update to be visible at 1e-5.
    lr, wd = 1e-3, 0.001
    c = config(lr=lr, weight_decay=wd)
    data = batches(2)
    state, curve = run_steps(c, parallel.make_mesh((("data", -1),), jax.devices()[:1]), data, model=ours)

    opt = torch.optim.Adam(ref.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=wd)
    ref.train()
    ref_losses = []
    for b in data:
        pixels = torch.from_numpy(b["image"].transpose(0, 3, 1, 2).copy())
        out = ref(pixel_values=pixels, input_ids=torch.from_numpy(b["ids"].astype(np.int64)))
        target = torch.arange(BATCH)
        loss = 0.5 * (torch.nn.functional.cross_entropy(out.logits_per_image, target)
                      + torch.nn.functional.cross_entropy(out.logits_per_text, target))
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_losses.append(loss.item())

    np.testing.assert_allclose([m["loss"] for m in curve], ref_losses, atol=1e-5, rtol=0)
    ours_after = clip.to_hf_state_dict(nnx.merge(nnx.graphdef(ours), state.params))
    ref_after = {k: v.detach().numpy() for k, v in ref.state_dict().items() if k in ours_after}
    assert set(ref_after) == set(ours_after)
    moved = 0
    before = clip.to_hf_state_dict(ours)
    for key, value in ref_after.items():
        np.testing.assert_allclose(ours_after[key], value, atol=1e-5, rtol=0, err_msg=key)
        moved += not np.allclose(before[key], value, atol=1e-4)
    assert moved > len(ref_after) // 2  # the step really changed the parameters


# ---------------------------------------------------------------------------------------------
# Meshes
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_same_losses_on_one_device_data_parallel_and_fsdp():
    data = batches(5, seed=1)
    c = config(lr=1e-3)
    curves, finals = {}, {}
    for name, spec, n in [("1", (("data", -1),), 1), ("dp8", (("data", -1),), 8),
                          ("dp4xfsdp2", (("data", 4), ("fsdp", 2)), 8)]:
        mesh = parallel.make_mesh(spec, jax.devices()[:n])
        state, curve = run_steps(c, mesh, data)
        curves[name] = [m["loss"] for m in curve]
        finals[name] = jax.device_get(state.params)
        if name == "dp4xfsdp2":
            kernel = state.params["vision_model"]["encoder"]["layers"][0]["mlp"]["fc1"]["kernel"]
            assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp")
            assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (16, 64)
            moments = [(optim.path_name(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state.opt_state)
                       if optim.path_name(p).endswith("vision_model.encoder.layers.0.mlp.fc1.kernel")]
            assert len(moments) == 2  # Adam's mu and nu follow their parameter's sharding
            assert all(x.sharding.spec == jax.sharding.PartitionSpec("fsdp") for _, x in moments)
    np.testing.assert_allclose(curves["dp8"], curves["1"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(curves["dp4xfsdp2"], curves["1"], atol=1e-5, rtol=0)
    assert curves["1"][-1] < curves["1"][0]
    for name in ("dp8", "dp4xfsdp2"):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                               finals[name], finals["1"])


def test_mesh_parsing_and_sharding_rules():
    assert parallel.parse_mesh((("data", -1), ("fsdp", 2)), 8) == (("data", "fsdp"), (4, 2))
    with pytest.raises(ValueError, match="not divisible"):
        parallel.parse_mesh((("data", -1), ("fsdp", 3)), 8)
    with pytest.raises(ValueError, match="'model' is not one of"):
        parallel.parse_mesh((("model", 2),), 2)
    with pytest.raises(ValueError, match="has 4 devices, but 8"):
        parallel.parse_mesh((("data", 2), ("fsdp", 2)), 8)
    mesh = parallel.make_mesh((("data", 2), ("fsdp", 4)))
    P = jax.sharding.PartitionSpec
    assert parallel.spec_for(("embed", "mlp"), (64, 128), [("embed", "fsdp")], mesh) == P("fsdp")
    assert parallel.spec_for(("mlp", "embed"), (128, 64), [("embed", "fsdp")], mesh) == P(None, "fsdp")
    assert parallel.spec_for(("embed",), (6,), [("embed", "fsdp")], mesh) == P()  # 6 % 4: replicated
    # one mesh axis per array: the second dimension that asks for it is replicated
    assert parallel.spec_for(("vocab", "embed"), (8, 8), [("vocab", "fsdp"), ("embed", "fsdp")], mesh) == P("fsdp")
    with pytest.raises(ValueError, match="mesh axis 'fdsp'"):
        parallel.check_rules([("embed", "fdsp")])


# ---------------------------------------------------------------------------------------------
# Loss and optimizer options
# ---------------------------------------------------------------------------------------------

def test_clip_loss_against_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 6)).astype(np.float32) * 3
    target = np.arange(6)

    def ce(x):
        x = x - x.max(1, keepdims=True)
        return np.mean(np.log(np.exp(x).sum(1)) - x[target, target])

    np.testing.assert_allclose(losses.clip_loss(jnp.asarray(logits)), 0.5 * (ce(logits) + ce(logits.T)), rtol=1e-6)
    acc = losses.retrieval_accuracy(jnp.asarray(np.eye(4) * 5 + np.eye(4)[[1, 0, 2, 3]] * 10))
    assert float(acc["image_to_text_top1"]) == 0.5 and float(acc["text_to_image_top1"]) == 0.5


def test_freeze_regex_keeps_the_text_tower_fixed():
    mesh = parallel.make_mesh((("data", -1),), jax.devices()[:1])
    c = config(lr=1e-3, freeze=r"^(text_model|text_projection)\.")
    model = clip.from_config(c.model, seed=0)
    before = jax.device_get(nnx.state(model, nnx.Param))
    state, _ = run_steps(c, mesh, batches(2), model=clip.from_config(c.model, seed=0))
    after = jax.device_get(state.params)
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
    changed = {optim.path_name(p): not np.array_equal(v, flat_before[p])
               for p, v in jax.tree_util.tree_leaves_with_path(after)}
    text = [n for n in changed if n.startswith(("text_model.", "text_projection."))]
    assert text and not any(changed[n] for n in text)
    assert changed["vision_model.encoder.layers.0.mlp.fc1.kernel"] and changed["logit_scale"]
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.make(config(freeze="^nothing").optim, nnx.state(model, nnx.Param), 10)


@pytest.mark.slow
def test_accumulation_equals_mean_gradient_of_the_micro_batches():
    """Two micro-batches of 4 with accumulate_steps=2 make one update with the mean gradient."""
    mesh = parallel.make_mesh((("data", -1),), jax.devices()[:1])
    data = batches(2, seed=3, batch=4)
    acc_state, _ = run_steps(config(lr=1e-3, accumulate_steps=2), mesh, data)

    model = clip.from_config(config().model, seed=0)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, b):
        li, _ = nnx.merge(graphdef, p)(b["image"], b["ids"])
        return losses.clip_loss(li)

    grads = [jax.grad(loss)(params, {k: jnp.asarray(v) for k, v in b.items()}) for b in data]
    mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, *grads)
    tx, _ = optim.make(config(lr=1e-3).optim, params, 1)
    updates, _ = tx.update(mean, tx.init(params), params)
    expected = jax.device_get(optax_apply(params, updates))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
                           jax.device_get(acc_state.params), expected)


def optax_apply(params, updates):
    import optax
    return optax.apply_updates(params, updates)


def test_schedule_warmup_and_cosine():
    c = optim.default_config()
    c.update(dict(lr=1.0, schedule="cosine", warmup_steps=10, final_lr_ratio=0.1))
    lr = optim.schedule(c, 110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(60), lr(110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    c.schedule = "linear"
    np.testing.assert_allclose(optim.schedule(c, 110)(60), 0.55, atol=1e-6)


def test_timm_cosine_schedule_equals_deits_stepping_of_timms_scheduler(timm_module):
    torch = pytest.importorskip("torch")
    cosine_lr = timm_module("scheduler/cosine_lr.py")
    epochs, per_epoch, lr = 30, 4, 1e-3
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=lr)
    # timm's create_scheduler for DeiT's arguments: cosine, min 1e-5, warm-up 5 epochs from 1e-6
    sched = cosine_lr.CosineLRScheduler(opt, t_initial=epochs, t_mul=1.0, lr_min=1e-5, decay_rate=0.1,
                                        warmup_lr_init=1e-6, warmup_t=5, cycle_limit=1, t_in_epochs=True)
    theirs = []
    for epoch in range(epochs):  # DeiT's main.py: train one epoch, then lr_scheduler.step(epoch)
        theirs.append(opt.param_groups[0]["lr"])
        sched.step(epoch)
    c = optim.default_config()
    c.update(dict(name="adamw", lr=lr, schedule="timm_cosine", schedule_unit="epoch", warmup_steps=5,
                  warmup_init_lr=1e-6, final_lr_ratio=1e-5 / lr))
    _, schedule = optim.make(c, {"w": np.zeros(1)}, total_steps=epochs * per_epoch, steps_per_epoch=per_epoch)
    ours = [float(schedule(step)) for step in range(epochs * per_epoch)]
    np.testing.assert_allclose(ours, np.repeat(theirs, per_epoch), rtol=1e-5, atol=1e-12)
    assert theirs[0] == theirs[1] == 1e-6  # DeiT's stepping: epochs 0 and 1 both at the warm-up start


def test_timm_cosine_needs_epoch_units():
    c = optim.default_config()
    c.update(dict(schedule="timm_cosine", schedule_unit="step"))
    with pytest.raises(ValueError, match="schedule_unit='epoch'"):
        optim.validate(c)


def test_grad_clipping_bounds_the_first_sgd_step():
    c = optim.default_config()
    c.update(dict(name="sgd", momentum=0.0, weight_decay=0.0, lr=1.0, grad_clip_norm=0.5))
    params = {"w": jnp.zeros(4)}
    tx, _ = optim.make(c, params, 1)
    updates, _ = tx.update({"w": jnp.asarray([3.0, 4.0, 0.0, 0.0])}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.3, -0.4, 0, 0], atol=1e-6)


@pytest.mark.parametrize("key,value,match", [
    ("name", "adamax", "config.optim.name='adamax'"),
    ("lr", 0.0, "config.optim.lr=0.0"),
    ("b2", 1.5, "config.optim.b2=1.5"),
    ("schedule", "step", "config.optim.schedule='step'"),
    ("freeze", "(", "config.optim.freeze='\\('"),
    ("accumulate_steps", 0, "config.optim.accumulate_steps=0"),
])
def test_bad_optimizer_values_are_named(key, value, match):
    c = optim.default_config()
    c[key] = value
    with pytest.raises(ValueError, match=match):
        optim.validate(c)
