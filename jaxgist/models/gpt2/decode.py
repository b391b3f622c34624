"""Caption decoding with GPT-2 from a prefix of input embeddings, under ``jit`` with a KV cache.

The loop is CgT-GAN's (its ``ClipCaptionModel.generate``): the prefix [B, P, D] goes in as input
embeddings, then each step feeds the token it drew. ``greedy`` takes the argmax; ``sample`` divides the
logits by ``temperature``, applies ``filter_logits`` (top-k, then top-p) and draws from the softmax of
what is left (``draw``), ``num_samples`` sequences per prefix. At most ``max_new_tokens`` tokens; a sequence
stops after its ``stop_id`` (GPT-2's "." = 13) and is padded with ``pad_id`` (GPT-2's
``<|endoftext|>``) after it; a sequence that has not stopped after ``max_new_tokens`` gets
``stop_id`` as its last token. Its score is the mean log-probability of the tokens it drew up to and
including the stop (the reference's length normalization); log-probabilities are those of the
distribution each token was drawn from (greedy: the model's; sampling: after temperature and
filtering). Sampling runs GPT-2's dropout (the reference samples in training mode) unless
``dropout=False``; greedy never does.

    out = decode.greedy(model, prefix)                            # tokens [B, 20], scores [B]
    out = decode.sample(model, prefix, jax.random.key(0))         # tokens [B, 5, 20], scores [B, 5]
    out = decode.sample(model, prefix, key, temperature=0.7, top_k=50, top_p=0.9, dropout=False)

One compiled program per (model structure, prefix shape, number of samples and tokens, top-k, top-p,
temperature, dropout); ``stop_id`` and ``pad_id`` are traced arguments. Without dropout the prefix
runs once per image and its cache is shared by the samples; with dropout each sample runs it with its
own dropout masks, as in the reference.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgist.models.gpt2.model import GPT2

STOP_ID = 13  # GPT-2's "."
PAD_ID = 50256  # GPT-2's <|endoftext|>
MAX_NEW_TOKENS = 20


class Decoded(NamedTuple):
    """Decoding results; leading axes [B] (greedy) or [B, K] (sampling), then T = max_new_tokens."""

    tokens: jax.Array  # int32 [..., T]: the captions: up to the stop token, then pad_id
    scores: jax.Array  # float32 [...]: mean log-probability of the tokens up to and including the stop
    lengths: jax.Array  # int32 [...]: how many tokens the score averages over
    logprobs: jax.Array  # float32 [..., T]: each drawn token's log-probability (0 after the stop)
    sampled: jax.Array  # int32 [..., T]: the tokens as drawn and fed back (no padding, no forced stop; 0
    # after the step where every sequence had stopped)


@functools.partial(jax.jit, static_argnames=("temperature", "top_k", "top_p"))
def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """``logits / temperature``, then the reference's ``top_k_top_p_filtering``: with ``top_k`` > 0,
    logits below the k-th largest become -inf; with ``top_p`` < 1, tokens (by decreasing logit) whose
    preceding cumulative probability exceeds ``top_p`` become -inf (the most likely token stays).
    The three settings are static (Python numbers)."""
    if temperature != 1.0:
        logits = logits / jnp.asarray(temperature, logits.dtype)
    vocab = logits.shape[-1]
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, vocab))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1, descending=True)
        ordered = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        remove = jnp.concatenate([jnp.zeros_like(cumulative[..., :1], bool), cumulative[..., :-1] > top_p], axis=-1)
        rows = jnp.arange(logits.shape[0])[:, None]
        remove = jnp.zeros(logits.shape, bool).at[rows, order].set(remove)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def _token_logprob(logits, tokens):
    """log softmax(logits)[token] of each row, without writing out the whole log-softmax."""
    return jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


def draw(key, logits, chunk: int = 256):
    """One token per row of ``logits`` [N, V] drawn from their softmax (-inf: never), and its
    log-probability: ``(tokens [N] int32, logprobs [N])``.

    Inverts the cumulative distribution with one uniform number per row, in two levels (which chunk
    of ``chunk`` tokens, then which token in it): one pass over the logits instead of the V random
    numbers per row of Gumbel-max sampling (``jax.random.categorical``), which cost more than the LM
    head on a CPU."""
    n, vocab = logits.shape
    top = jnp.max(logits, axis=-1, keepdims=True)
    full, rest = divmod(vocab, chunk)
    sums = jnp.exp(logits[:, :full * chunk].reshape(n, full, chunk) - top[:, :, None]).sum(axis=-1)  # [N, full]
    if rest:
        sums = jnp.concatenate([sums, jnp.exp(logits[:, full * chunk:] - top).sum(axis=-1, keepdims=True)], axis=-1)
    chunks = sums.shape[1]
    cumulative = jnp.cumsum(sums, axis=-1)
    total = cumulative[:, -1]
    u = jnp.minimum(jax.random.uniform(key, (n,)) * total, jnp.nextafter(total, 0.0))
    which = jnp.minimum(jnp.sum(cumulative <= u[:, None], axis=-1), chunks - 1)  # the first chunk past u
    before = jnp.where(which > 0, jnp.take_along_axis(cumulative, jnp.maximum(which - 1, 0)[:, None], 1)[:, 0], 0.0)
    index = which[:, None] * chunk + jnp.arange(chunk)[None, :]  # the chunk's tokens, [N, chunk]
    inside = jnp.take_along_axis(logits, jnp.minimum(index, vocab - 1), axis=1)
    inside = jnp.cumsum(jnp.where(index < vocab, jnp.exp(inside - top), 0.0), axis=-1)
    left = jnp.minimum(u - before, jnp.nextafter(inside[:, -1], 0.0))  # below the chunk's mass: weight > 0
    tokens = (which * chunk + jnp.minimum(jnp.sum(inside <= left[:, None], axis=-1), chunk - 1)).astype(jnp.int32)
    logprobs = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - top[:, 0] - jnp.log(total)
    return tokens, logprobs


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "is_greedy", "temperature", "top_k", "top_p",
                                             "use_dropout", "max_new_tokens"))
def _decode(graphdef, state, prefix, key, stop_id, pad_id, *, num_samples, is_greedy, temperature, top_k, top_p,
            use_dropout, max_new_tokens):
    model: GPT2 = nnx.merge(graphdef, state)
    b, p, _ = prefix.shape
    n, steps = b * num_samples, max_new_tokens
    lm_head = model.transformer.wte.embedding[...].astype(model.config.dtype)  # cast once, not per step
    key, prefill_key = jax.random.split(key)
    if use_dropout:  # every sample runs its prefix with its own dropout masks
        hidden, cache = model.forward(jnp.repeat(prefix, num_samples, axis=0), cache=model.init_cache(n, p),
                                      dropout_key=prefill_key)
        logits = model.logits(hidden[:, -1], lm_head)
    else:  # one prefix pass per image, its cache shared by the samples
        hidden, cache = model.forward(prefix, cache=model.init_cache(b, p))
        logits = jnp.repeat(model.logits(hidden[:, -1], lm_head), num_samples, axis=0)
        cache = cache.repeat(num_samples)
    cache = cache.extend(p + steps - 1)  # the prefix attended over its own positions only

    def step(carry):
        t, logits, cache, unfinished, active, sampled, logprobs, key = carry
        key, sample_key, dropout_key = jax.random.split(key, 3)
        if is_greedy:
            token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            logprob = _token_logprob(logits, token)
        else:
            token, logprob = draw(sample_key, filter_logits(logits, temperature, top_k, top_p))
        active = active.at[:, t].set(unfinished)
        sampled = sampled.at[:, t].set(token)
        logprobs = logprobs.at[:, t].set(jnp.where(unfinished, logprob, 0.0))
        unfinished = unfinished & (token != stop_id)

        def advance(operands):
            _, cache = operands
            hidden, cache = model.forward(model.embed_tokens(token[:, None]), cache=cache,
                                          dropout_key=dropout_key if use_dropout else None)
            return model.logits(hidden[:, 0], lm_head), cache

        logits, cache = jax.lax.cond(t + 1 < steps, advance, lambda operands: operands, (logits, cache))
        return t + 1, logits, cache, unfinished, active, sampled, logprobs, key

    def running(carry):
        return (carry[0] < steps) & jnp.any(carry[3])

    carry = (jnp.zeros((), jnp.int32), logits, cache, jnp.ones((n,), bool), jnp.zeros((n, steps), bool),
             jnp.zeros((n, steps), jnp.int32), jnp.zeros((n, steps), jnp.float32), key)
    _, _, _, unfinished, active, sampled, logprobs, _ = jax.lax.while_loop(running, step, carry)
    tokens = jnp.where(active, sampled, pad_id)
    tokens = tokens.at[:, -1].set(jnp.where(unfinished, stop_id, tokens[:, -1]))  # never stopped: end with it
    lengths = active.sum(axis=1).astype(jnp.int32)
    scores = logprobs.sum(axis=1) / jnp.maximum(lengths, 1)
    shape = (b, num_samples) if not is_greedy else (b,)
    return Decoded(tokens.reshape(*shape, steps), scores.reshape(shape), lengths.reshape(shape),
                   logprobs.reshape(*shape, steps), sampled.reshape(*shape, steps))


def _check(model: GPT2, prefix, max_new_tokens: int):
    if not isinstance(model, GPT2):
        raise TypeError(f"expected a GPT2 model, got {type(model).__name__}")
    prefix = jnp.asarray(prefix)
    if prefix.ndim != 3 or prefix.shape[-1] != model.width:
        raise ValueError(f"prefix embeddings of shape {tuple(prefix.shape)}: expected [B, P, {model.width}] "
                         f"(GPT-2's width)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
    total = prefix.shape[1] + max_new_tokens - 1
    if total > model.config.n_positions:
        raise ValueError(f"a prefix of {prefix.shape[1]} and {max_new_tokens} new tokens need {total} positions; "
                         f"GPT-2 has {model.config.n_positions}")
    return prefix


def greedy(model: GPT2, prefix, *, max_new_tokens: int = MAX_NEW_TOKENS, stop_id: int = STOP_ID,
           pad_id: int = PAD_ID) -> Decoded:
    """Greedy captions of prefix embeddings [B, P, D]: ``Decoded`` with tokens [B, T], scores [B]. No dropout."""
    prefix = _check(model, prefix, max_new_tokens)
    graphdef, state = nnx.split(model)
    return _decode(graphdef, state, prefix, jax.random.key(0), jnp.int32(stop_id), jnp.int32(pad_id),
                   num_samples=1, is_greedy=True, temperature=1.0, top_k=0, top_p=1.0, use_dropout=False,
                   max_new_tokens=int(max_new_tokens))


def sample(model: GPT2, prefix, key, *, num_samples: int = 5, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, dropout: bool = True, max_new_tokens: int = MAX_NEW_TOKENS, stop_id: int = STOP_ID,
           pad_id: int = PAD_ID) -> Decoded:
    """``num_samples`` sampled captions per prefix embedding [B, P, D]: ``Decoded`` with tokens
    [B, K, T], scores [B, K]. ``key``: a PRNG key or an int seed. ``dropout``: run GPT-2's dropout, as
    the reference's sampling does (a model with zero rates has none)."""
    prefix = _check(model, prefix, max_new_tokens)
    problems = []
    if num_samples < 1:
        problems.append(f"num_samples={num_samples} must be at least 1")
    if not temperature > 0:
        problems.append(f"temperature={temperature} must be positive")
    if top_k < 0:
        problems.append(f"top_k={top_k} must be >= 0 (0: no top-k filtering)")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"top_p={top_p} is not in (0, 1] (1: no nucleus filtering)")
    if problems:
        raise ValueError("; ".join(problems))
    if isinstance(key, int):
        key = jax.random.key(key)
    graphdef, state = nnx.split(model)
    return _decode(graphdef, state, prefix, key, jnp.int32(stop_id), jnp.int32(pad_id), num_samples=int(num_samples),
                   is_greedy=False, temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   use_dropout=bool(dropout) and model.config.has_dropout, max_new_tokens=int(max_new_tokens))
