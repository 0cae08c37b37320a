"""`model.init_from`: a run starts from another run's checkpoint (issue 11).

The other run's trainable parameters are read straight into this run's shardings and become
its reference; this run's checkpoints hold that reference, so a resume never needs the other
run again. Errors name the problem: no checkpoint, a missing step (the message lists the
saved ones), another architecture, `init_step` without `init_from`.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import test_train_loop
from flax import nnx

from visionr1_jax import checkpoint, config_lib, sections, train
from visionr1_jax.models import hf_weights
from visionr1_jax.state import frozen_filter, init_train_state

ckpt, data_dir = test_train_loop.ckpt, test_train_loop.data_dir  # the loop tests' fixtures
loop_config = test_train_loop.loop_config


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def source(ckpt, data_dir, tmp_path_factory):
    """Another run's workdir with checkpoints at steps 2 and 5 whose parameters differ from
    the start checkpoint's (noise added), and those parameters of step 5."""
    workdir = str(tmp_path_factory.mktemp("source_run"))
    config = loop_config(ckpt, data_dir, beta=0.0)
    config.checkpoint = sections.checkpoint_config()
    model = hf_weights.from_pretrained(ckpt, dtype=jnp.float32, compute_dtype=jnp.float32)
    _, state = init_train_state(model, config, jax.random.key(0), beta=0.0)
    saver = checkpoint.Checkpointer(workdir, config)
    for step in (2, 5):
        noise = lambda x, s=step: x + s * 1e-2 * jax.random.normal(jax.random.key(s), x.shape)
        state = state.__class__(**{**state.__dict__, "params": jax.tree.map(noise, state.params)})
        saver.save(step, state, b"{}", {})
    saver.close()
    return workdir, leaves(state.params)


def test_run_starts_from_another_runs_checkpoint_and_resumes_without_it(
    ckpt, data_dir, source, tmp_path
):
    src, want = source
    c = loop_config(ckpt, data_dir, beta=0.04)
    c.model.init_from = src
    c.checkpoint = sections.checkpoint_config()
    job = train.setup(c, str(tmp_path))
    start = hf_weights.from_pretrained(ckpt, dtype=jnp.float32, compute_dtype=jnp.float32)
    _, _, start_params = nnx.split(start, frozen_filter(c), ...)
    for got, w, s in zip(leaves(job.state.params), want, leaves(start_params), strict=True):
        np.testing.assert_array_equal(got, w)  # the newest checkpoint's (step 5), exactly
        assert not np.array_equal(got, s)
    for got, w in zip(leaves(job.state.ref_params), want, strict=True):
        np.testing.assert_array_equal(got, w)  # ...which is the reference
    train.save_checkpoint(job, {})  # before any rollout: no thresholds
    job.io.checkpointer.close()
    job.io.pipe.close()

    # This run's checkpoint holds the reference: a resume (`setup` restores with the run's
    # own Checkpointer and never reads init_from then) gets it back with the other run gone.
    shutil.rmtree(src + "_moved", ignore_errors=True)
    shutil.move(src, src + "_moved")
    try:
        loader = checkpoint.Checkpointer(str(tmp_path), c)
        assert loader.latest_step() == 0
        like = dataclasses.replace(
            job.state, ref_params=jax.tree.map(jnp.zeros_like, job.state.params)
        )
        got = loader.restore(0, like).state
        loader.close()
        for a, w in zip(leaves(got.ref_params), want, strict=True):
            np.testing.assert_array_equal(a, w)
    finally:
        shutil.move(src + "_moved", src)


def test_init_step_and_errors(ckpt, source, tmp_path):
    src, _ = source
    model = hf_weights.from_pretrained(ckpt, dtype=jnp.float32, compute_dtype=jnp.float32)
    _, _, like = nnx.split(model, nnx.Nothing, ...)
    got, step = checkpoint.load_params(src, 2, like)
    assert step == 2
    assert not all(
        np.array_equal(a, b) for a, b in zip(leaves(got), leaves(like), strict=True)
    )  # step 2's noise
    with pytest.raises(FileNotFoundError, match=r"model.init_step=3: .* \(has \[2, 5\]\)"):
        checkpoint.load_params(src, 3, like)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.load_params(str(tmp_path), None, like)
    wrong = jax.tree.map(lambda x: jnp.zeros((*x.shape[:-1], x.shape[-1] + 1)), like)
    with pytest.raises(ValueError, match="another architecture"):
        checkpoint.load_params(src, None, wrong)
    c = loop_config(ckpt, "unused", beta=0.04)
    c.model.init_step = 2
    with pytest.raises(ValueError, match=r"init_step=2 has no effect without model\.init_from"):
        config_lib.validate(c)
