"""Run checkpoints (issue #11): orbax saves of the train state, every host's data position and
the run's meta; resume from the newest complete checkpoint; SIGTERM saves and exits 0.

- the section is validated (values that would never take effect are errors);
- a checkpoint saved on a (2, 2, 2) mesh of 8 devices restores onto 1 device and onto a
  (1, 4, 2) mesh with the same parameters, optimizer state, step and key;
- a `main` run killed with SIGKILL (while a checkpoint is being written when the kill catches
  one, else right after the first one is committed) and started again with the same command
  resumes from the newest complete checkpoint; a SIGTERM then saves and exits 0; the resumed
  run's final parameters, metrics and rollouts are bit-identical to an uninterrupted run's
  (and the parameters moved: weight decay, since the tiny model's rewards are all 0);
- the same for a 2-process `jax.distributed` run: tests/test_checkpoint_multiprocess.py (its
  own file, so that pytest-xdist runs it beside this one).

The `main` runs are subprocesses started by `launch` (tests/launch.py).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import launch
import ml_collections
import numpy as np
import pytest

from visionr1_jax import checkpoint, config_lib, loading, rollout, sections, train
from visionr1_jax.metrics import read_jsonl
from visionr1_jax.models import hf_weights, tiny
from visionr1_jax.state import TrainState, init_train_state, shardings_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(ckpt: str = "", data_dir: str = "", **over) -> ml_collections.ConfigDict:
    config = config_lib.load_config(os.path.join(ROOT, "configs", "demo_cpu.py:experiment=False"))
    config.total_steps = 4
    config.progress = False
    config.log_rollouts = 4
    config.model.checkpoint = ckpt
    config.data.data_dir = data_dir
    config.data.builder_config = "loop"
    config.data.batch_size = 2
    config.grpo.num_generations = 2
    config.grpo.max_new_tokens = 8
    config.optim.learning_rate = 1e-3
    config.mesh = sections.mesh_config(ici=(1, 1, 1))
    config.checkpoint = sections.checkpoint_config()
    config.checkpoint.every = 1
    for key, value in over.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


@pytest.mark.parametrize(
    "over, message",
    [
        ({"checkpoint.every": -1}, r"checkpoint.every=-1"),
        ({"grpo.num_iterations": 2, "checkpoint.every": 3}, r"not a multiple of grpo"),
        ({"checkpoint.keep": 0}, r"checkpoint.keep=0"),
        ({"checkpoint.every": 2, "checkpoint.keep_period": 3}, r"keep_period=3"),
        ({"checkpoint.keep_period": 0}, r"checkpoint.keep_period=0"),
    ],
)
def test_validation_rejects_values_without_effect(over, message):
    config = run_config(**over)
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config)


# ------------------------------------------------------------------------ restore on meshes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    return tiny.write_tiny_checkpoint(
        path, "qwen2_5_vl_tiny", tokenizer="small", min_pixels=3136, max_pixels=112 * 112
    )


def state_on(ckpt: str, ici: tuple[int, int, int], seed: int = 0):
    config = run_config(ckpt)
    config.mesh = sections.mesh_config(ici=ici)
    mesh = loading.make_run_mesh(config)
    with jax.set_mesh(mesh):
        model = hf_weights.from_pretrained(ckpt, mesh=mesh)
        _, state = init_train_state(model, config, jax.random.key(seed))
    return config, mesh, state


def host_tree(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.saved_tree(state))]


def test_restore_onto_other_meshes_gives_the_same_state(ckpt, tmp_path, monkeypatch):
    config, _, state = state_on(ckpt, (2, 2, 2), seed=7)
    # A state that is not the start one: parameters and Adam moments moved, step 5.
    bump = lambda x: x + jnp.asarray(0.25, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    state = TrainState(
        params=jax.tree.map(bump, state.params),
        frozen=state.frozen,
        opt_state=jax.tree.map(bump, state.opt_state),
        step=jnp.asarray(5, jnp.int32),
        rng=state.rng,
        ref_params=state.ref_params,
    )
    monkeypatch.chdir(tmp_path)  # a relative workdir, as `make demo` passes
    saver = checkpoint.Checkpointer("run", config)
    saver.save(5, state, b'{"position": 5}', {"note": "test"})
    saver.close()
    want = host_tree(state)
    assert any(s.spec != jax.sharding.PartitionSpec() for s in jax.tree.leaves(
        shardings_of(state.params)))  # fmt: skip  # really sharded when saved
    for ici in ((1, 1, 1), (1, 4, 2)):
        _, _, like = state_on(ckpt, ici, seed=0)
        loader = checkpoint.Checkpointer("run", config)
        assert loader.latest_step() == 5
        got = loader.restore(5, like)
        loader.close()
        assert got.data_state == b'{"position": 5}'
        assert got.meta["step"] == 5 and got.meta["note"] == "test"
        assert got.meta["config"]["grpo"]["num_generations"] == 2
        for g, w in zip(host_tree(got.state), want, strict=True):
            np.testing.assert_array_equal(g, w)  # bit-identical: a copy, no arithmetic
        # the restored arrays live on the restoring run's mesh, with its shardings
        assert shardings_of(got.state.params) == shardings_of(like.params)
        assert got.state.ref_params is like.ref_params


# ------------------------------------------------------------------- kill, resume, SIGTERM

STEPS = 6
OVERRIDES = {
    "total_steps": STEPS,
    "log_rollouts": STEPS,
    "progress": False,
    "grpo.num_generations": 2,
    "grpo.max_new_tokens": 8,
    "optim.learning_rate": 1e-3,
    # The tiny model's completions never parse, so every reward and advantage is 0 and the
    # loss has no gradient: weight decay moves the parameters anyway (by lr(t) x 0.1 x w per
    # step), so that the final parameters depend on every step having run, in order.
    "optim.weight_decay": 0.1,
    "data.builder_config": "loop",
    "data.batch_size": 2,
    "checkpoint.every": 2,
    "checkpoint.keep": 2,
    "mesh.ici_parallelism": "(1,1,1)",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, ckpt):
    root = tmp_path_factory.mktemp("assets")
    return {
        "data_dir": launch.write_dataset(tmp_path_factory.mktemp("data")),
        "checkpoint": ckpt,
        "config": launch.write_config(root),
        "cache": str(root / "jax_cache"),
    }


def start(assets, workdir: str, processes: int = 1, devices: int = 1, **over) -> launch.Run:
    """One `main` run of the test config (`processes` x `devices`; the fast-compilation XLA
    flags, as every run: bit-identity holds between them). The runs share jax's
    persistent compilation cache, so a restarted run loads its programs instead of compiling
    them (as a user's restarted job can)."""
    overrides = {
        **OVERRIDES,
        "model.checkpoint": assets["checkpoint"],
        "data.data_dir": assets["data_dir"],
        **over,
    }
    return launch.start(
        assets["config"], workdir, overrides, processes, devices, cache=assets["cache"]
    )


def final_state(workdir: str, ckpt: str, steps: int = STEPS, like=None):
    """The train state of the run's final checkpoint, restored onto 1 device of this
    process into `like` (default: the start state from `ckpt`). The data item (each host's
    pipeline position, compared on disk by `assert_same_runs`) is left out: this 1-process
    restore could read only host 0's of a multi-process run's."""
    if like is None:
        _, _, like = state_on(ckpt, (1, 1, 1))
    loader = checkpoint.Checkpointer(workdir, run_config(ckpt))
    step = loader.latest_step()
    assert step == steps
    got = loader.restore(step, like, data=False)
    loader.close()
    return got.state


def final_params(workdir: str, ckpt: str, steps: int = STEPS) -> list[np.ndarray]:
    """The parameters, optimizer state, step and key of the run's final checkpoint."""
    return host_tree(final_state(workdir, ckpt, steps))


def assert_same_runs(got_dir: str, want_dir: str, ckpt: str, steps: int = STEPS) -> None:
    """The run in `got_dir` ended bit-identical to the one in `want_dir`: final parameters
    and optimizer state, every host's pipeline position, one metrics line per step with the
    same values, and the same rollouts."""
    _, _, start = state_on(ckpt, (1, 1, 1))
    got_state = final_state(got_dir, ckpt, steps, like=start)
    want_state = final_state(want_dir, ckpt, steps, like=start)
    for g, w in zip(host_tree(got_state), host_tree(want_state), strict=True):
        np.testing.assert_array_equal(g, w)
    # ...and the parameters did move: equal start weights would make the comparison vacuous
    pairs = zip(jax.tree.leaves(got_state.params), jax.tree.leaves(start.params), strict=True)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)
    data = sorted(glob.glob("process_*.json", root_dir=f"{want_dir}/checkpoints/{steps}/data"))
    assert data, want_dir
    for name in data:
        got, want = (os.path.join(d, "checkpoints", str(steps), "data", name)
                     for d in (got_dir, want_dir))  # fmt: skip
        with open(got, "rb") as g, open(want, "rb") as w:
            assert g.read() == w.read(), name
    want = read_jsonl(os.path.join(want_dir, "metrics.jsonl"))
    got = read_jsonl(os.path.join(got_dir, "metrics.jsonl"))
    assert [m["step"] for m in got] == list(range(steps))
    for g, w in zip(got, want, strict=True):
        for key in ("reward/total", "loss", "kl", "grad_norm", "completion/length"):
            assert g[key] == w[key], (g["step"], key, g[key], w[key])
    want = read_jsonl(os.path.join(want_dir, "rollouts.jsonl"))
    got = read_jsonl(os.path.join(got_dir, "rollouts.jsonl"))
    assert got == want


def test_killed_run_resumes_bit_identical_and_sigterm_saves(assets, tmp_path):
    ref_dir, cut_dir = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    ref = start(assets, ref_dir)
    # The second run starts once the first has compiled every program (its first checkpoint
    # is committed at step 2): it loads them from the shared persistent cache.
    ref.wait_for(lambda: launch.committed(ref_dir))
    cut = start(assets, cut_dir)
    # Once its first checkpoint is committed, SIGKILL the second run while the next one is
    # being written, or (when the poll misses that write) right after it is committed.
    during_write = False
    cut.wait_for(lambda: launch.committed(cut_dir))
    first = launch.committed(cut_dir)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and cut.running():
        if launch.writing(cut_dir):
            during_write = True
            break
        if launch.committed(cut_dir) != first:
            break
        time.sleep(0.002)
    cut.kill()
    saved = launch.committed(cut_dir)
    print("killed during a checkpoint write:", during_write, "committed:", saved)
    assert saved and max(saved) < STEPS, saved

    # Same command again: resumes from the newest complete checkpoint; a SIGTERM as soon as
    # it says so (still in start-up) lets it run one iteration, save and exit 0.
    again = start(assets, cut_dir)
    again.wait_for(lambda: "resuming from checkpoint step" in again.text())
    again.send_signal(signal.SIGTERM)
    assert again.wait() == [0]
    text = again.text()
    assert f"resuming from checkpoint step {max(saved)}" in text, text[-3000:]
    assert f"SIGTERM: stopped after step {max(saved) + 1} (checkpoint saved)" in text
    assert max(launch.committed(cut_dir)) == max(saved) + 1
    # ...and once more to the end.
    last = start(assets, cut_dir)
    assert last.wait() == [0]
    assert ref.wait() == [0]

    assert_same_runs(cut_dir, ref_dir, assets["checkpoint"])
    kept = launch.committed(cut_dir)
    assert len(kept) == 2 and kept[-1] == STEPS, kept  # keep = 2


# --------------------------------------------------------------------------------- bad steps


def test_nan_steps_are_skipped_counted_and_stop_the_run(assets, tmp_path):
    """NaN injection through the reward hook: from step 2 every reward is NaN, so advantages,
    loss and gradients are. Each such step is skipped (parameters and optimizer state kept)
    and counted; `optim.max_bad_steps` = 2 in a row stops the run with the message, without
    saving, and the last checkpoint loads and holds the last good parameters."""
    c = run_config(assets["checkpoint"], assets["data_dir"], total_steps=6)
    c.optim.max_bad_steps = 2
    c.checkpoint.keep = None
    job = train.setup(c, str(tmp_path))

    def score(host_batch, completions, step):
        terms = rollout.score_rows(host_batch, completions, job.config.reward, step)
        if step >= 2:
            terms["reward/total"] = np.full_like(terms["reward/total"], np.nan)
        return terms

    job.programs.score_fn = score
    with pytest.raises(FloatingPointError, match=r"2 optimizer steps in a row .* step 3") as e:
        train.train_loop(job)
    assert "The last checkpoint (step 3) is intact" in str(e.value)
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [m["bad_step"] for m in rows] == [0, 0, 1, 1]
    assert [m["bad_steps_total"] for m in rows] == [0, 0, 1, 2]
    assert rows[2]["loss"] is None  # NaN, written as null
    # the loop's blocked time of each save, reported with the next step
    assert "time/checkpoint" not in rows[0] and all(m["time/checkpoint"] > 0 for m in rows[1:])
    assert launch.committed(str(tmp_path)) == [1, 2, 3]  # nothing saved after the second bad step
    _, _, like = state_on(assets["checkpoint"], (1, 1, 1))
    loader = checkpoint.Checkpointer(str(tmp_path), c)
    good, skipped = loader.restore(2, like).state, loader.restore(3, like).state
    loader.close()
    assert int(skipped.step) == 3
    # the skipped step left the parameters and the optimizer state exactly as they were
    for a, b in zip(jax.tree.leaves((good.params, good.opt_state)),
                    jax.tree.leaves((skipped.params, skipped.opt_state)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(skipped.params))


# ------------------------------------------------------------------- reference in host memory


def _text_score(reward_config):
    """The loop's scores (`reward_config`) with a reward that varies between an untrained
    model's completions (the share of their characters that are vowels), so that the policy
    moves."""

    def score(host_batch, completions, step):
        terms = rollout.score_rows(host_batch, completions, reward_config, step)
        vowels = [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in completions]
        terms["reward/total"] = np.asarray(vowels, np.float32) * terms["valid"]
        return terms

    return score


def test_reference_in_host_memory_trains_and_resumes_like_the_device_one(assets, tmp_path):
    """`grpo.reference_memory = "host"` (the 3B v5e-8 config's lever) through the whole loop:
    4 steps end with the parameters, optimizer state and metrics of the device-placed
    reference's run, bit for bit; the checkpoints hold no reference (it is rebuilt from the
    start weights), and a run restarted after losing its last two checkpoints resumes from
    step 2 and ends the same."""
    ends = {}
    for memory in ("device", "host"):
        c = run_config(assets["checkpoint"], assets["data_dir"], total_steps=4)
        c.grpo.reference_memory = memory
        c.checkpoint.keep = None
        job = train.setup(c, str(tmp_path / memory))
        job.programs.score_fn = _text_score(c.reward)
        assert {x.sharding.memory_kind for x in jax.tree.leaves(job.state.ref_params)} == {
            "pinned_host" if memory == "host" else "device"
        }
        train.train_loop(job)
        ends[memory] = read_jsonl(str(tmp_path / memory / "metrics.jsonl"))
    assert launch.committed(str(tmp_path / "host")) == [1, 2, 3, 4]
    for step in (3, 4):  # as if the run had died before these were written
        shutil.rmtree(tmp_path / "host" / "checkpoints" / str(step))
    c = run_config(assets["checkpoint"], assets["data_dir"], total_steps=4)
    c.grpo.reference_memory = "host"
    job = train.setup(c, str(tmp_path / "host"))
    job.programs.score_fn = _text_score(c.reward)
    assert int(job.state.step) == 2
    train.train_loop(job)
    for g, w in zip(final_params(str(tmp_path / "host"), assets["checkpoint"], 4),
                    final_params(str(tmp_path / "device"), assets["checkpoint"], 4),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(g, w)
    got = read_jsonl(str(tmp_path / "host" / "metrics.jsonl"))
    assert [m["step"] for m in got] == [0, 1, 2, 3]  # lines past the checkpoint replaced
    for g, w in zip(got, ends["device"], strict=True):
        for key in ("reward/total", "loss", "kl", "grad_norm"):
            assert g[key] == w[key], (g["step"], key, g[key], w[key])
    assert got[0]["grad_norm"] > 0 and got[3]["kl"] > 0  # the policy moved; the reference was read
