"""Run checkpoints (issue #11): orbax saves of the train state, every host's data position and
the run's meta; resume from the newest complete checkpoint; SIGTERM saves and exits 0.

- the section is validated (values that would never take effect are errors);
- a checkpoint saved on a (2, 2, 2) mesh of 8 devices restores onto 1 device and onto a
  (1, 4, 2) mesh with the same parameters, optimizer state, step and key;
- a `main` run killed with SIGKILL (while a checkpoint is being written when the kill catches
  one, else right after the first one is committed) and started again with the same command
  resumes from the newest complete checkpoint; a SIGTERM then saves and exits 0; the resumed
  run's final parameters, metrics and rollouts are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time

import conftest
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from visionr1_jax import checkpoint, config_lib, train
from visionr1_jax.data.builders import synthetic_shapes
from visionr1_jax.metrics import read_jsonl
from visionr1_jax.models import hf_weights, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(ckpt: str = "", data_dir: str = "", **over) -> ml_collections.ConfigDict:
    config = config_lib.load_config(os.path.join(ROOT, "configs", "demo_cpu.py"))
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
    config.mesh = config_lib.mesh_config(ici=(1, 1, 1))
    config.checkpoint = checkpoint.checkpoint_config()
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
    config.mesh = config_lib.mesh_config(ici=ici)
    mesh = train.make_run_mesh(config)
    with jax.set_mesh(mesh):
        model = hf_weights.from_pretrained(ckpt, mesh=mesh)
        _, state = train.init_train_state(model, config, jax.random.key(seed))
    return config, mesh, state


def host_tree(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(checkpoint.saved_tree(state))]


def test_restore_onto_other_meshes_gives_the_same_state(ckpt, tmp_path, monkeypatch):
    config, _, state = state_on(ckpt, (2, 2, 2), seed=7)
    # A state that is not the start one: parameters and Adam moments moved, step 5.
    bump = lambda x: x + jnp.asarray(0.25, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
    state = train.TrainState(
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
        train.shardings_of(state.params)))  # fmt: skip  # really sharded when saved
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
        assert train.shardings_of(got.state.params) == train.shardings_of(like.params)
        assert got.state.ref_params is like.ref_params


# ------------------------------------------------------------------- kill, resume, SIGTERM

CONFIG_WRAPPER = """
import importlib.util

_spec = importlib.util.spec_from_file_location("demo_cpu", {demo!r})
_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_demo)


def get_config():
    from visionr1_jax import checkpoint

    config = _demo.get_config()
    config.checkpoint = checkpoint.checkpoint_config()
    return config
"""

STEPS = 6
OVERRIDES = {
    "total_steps": STEPS,
    "log_rollouts": STEPS,
    "progress": False,
    "grpo.num_generations": 2,
    "grpo.max_new_tokens": 8,
    "optim.learning_rate": 1e-3,
    "data.builder_config": "loop",
    "data.batch_size": 2,
    "checkpoint.every": 2,
    "checkpoint.keep": 2,
    "mesh.ici_parallelism": "(1,1,1)",
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, ckpt):
    data_dir = str(tmp_path_factory.mktemp("data"))
    shapes = synthetic_shapes.ShapesConfig(name="loop", num_train=16, num_validation=2)
    synthetic_shapes.SyntheticShapes(config=shapes, data_dir=data_dir).download_and_prepare()
    root = tmp_path_factory.mktemp("assets")
    config = root / "config.py"
    config.write_text(CONFIG_WRAPPER.format(demo=os.path.join(ROOT, "configs", "demo_cpu.py")))
    cache = str(root / "jax_cache")
    return {"data_dir": data_dir, "checkpoint": ckpt, "config": str(config), "cache": cache}


def start(assets, workdir: str) -> tuple[subprocess.Popen, str]:
    """One `main` process of the test run (1 device, unoptimised XLA code generation, as
    every run: bit-identity holds between them). The runs share jax's persistent compilation
    cache, so a restarted run loads its programs instead of compiling them (as a user's
    restarted job can)."""
    overrides = {
        **OVERRIDES,
        "model.checkpoint": assets["checkpoint"],
        "data.data_dir": assets["data_dir"],
    }
    cmd = [
        sys.executable, "-m", "visionr1_jax.main", f"--config={assets['config']}",
        f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items()),
    ]  # fmt: skip
    flags = conftest.with_device_count(os.environ.get("XLA_FLAGS", ""), 1)
    flags += " --xla_backend_optimization_level=0"
    env = dict(
        os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, PYTHONPATH=ROOT,
        JAX_COMPILATION_CACHE_DIR=assets["cache"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    log = os.path.join(workdir, f"log_{time.monotonic_ns()}.txt")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=f)
    return proc, log


def wait(proc: subprocess.Popen, log: str, timeout: float = 600) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        with open(log, errors="replace") as f:
            pytest.fail(f"run timed out:\n{f.read()[-3000:]}")


def committed(workdir: str) -> list[int]:
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def writing(workdir: str) -> bool:
    return bool(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))


def final_params(workdir: str, ckpt: str) -> list[np.ndarray]:
    _, _, like = state_on(ckpt, (1, 1, 1))
    loader = checkpoint.Checkpointer(workdir, run_config(ckpt))
    step = loader.latest_step()
    assert step == STEPS
    got = loader.restore(step, like)
    loader.close()
    return host_tree(got.state)


def test_killed_run_resumes_bit_identical_and_sigterm_saves(assets, tmp_path):
    ref_dir, cut_dir = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    ref = start(assets, ref_dir)
    cut = start(assets, cut_dir)
    # Once its first checkpoint is committed, SIGKILL the second run while the next one is
    # being written, or (when the poll misses that write) right after it is committed.
    during_write = False
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and cut[0].poll() is None and not committed(cut_dir):
        time.sleep(0.01)
    first = committed(cut_dir)
    while time.monotonic() < deadline and cut[0].poll() is None:
        if writing(cut_dir):
            during_write = True
            break
        if committed(cut_dir) != first:
            break
        time.sleep(0.002)
    cut[0].send_signal(signal.SIGKILL)
    cut[0].wait()
    print("killed during a checkpoint write:", during_write, "committed:", committed(cut_dir))
    saved = committed(cut_dir)
    assert saved and max(saved) < STEPS, saved

    # Same command again: resumes from the newest complete checkpoint; a SIGTERM as soon as
    # it says so (still in start-up) lets it run one iteration, save and exit 0.
    again = start(assets, cut_dir)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and again[0].poll() is None:
        with open(again[1], errors="replace") as f:
            if "resuming from checkpoint step" in f.read():
                break
        time.sleep(0.05)
    again[0].send_signal(signal.SIGTERM)
    assert wait(*again) == 0
    with open(again[1]) as f:
        text = f.read()
    assert f"resuming from checkpoint step {max(saved)}" in text, text[-3000:]
    assert f"SIGTERM: stopped after step {max(saved) + 1} (checkpoint saved)" in text
    assert max(committed(cut_dir)) == max(saved) + 1
    # ...and once more to the end.
    last = start(assets, cut_dir)
    assert wait(*last) == 0
    assert wait(*ref) == 0

    for g, w in zip(final_params(cut_dir, assets["checkpoint"]),
                    final_params(ref_dir, assets["checkpoint"]), strict=True):  # fmt: skip
        np.testing.assert_array_equal(g, w)
    want = read_jsonl(os.path.join(ref_dir, "metrics.jsonl"))
    got = read_jsonl(os.path.join(cut_dir, "metrics.jsonl"))
    assert [m["step"] for m in got] == list(range(STEPS))
    for g, w in zip(got, want, strict=True):
        for key in ("reward/total", "loss", "kl", "grad_norm", "completion/length"):
            assert g[key] == w[key], (g["step"], key, g[key], w[key])
    want = read_jsonl(os.path.join(ref_dir, "rollouts.jsonl"))
    got = read_jsonl(os.path.join(cut_dir, "rollouts.jsonl"))
    assert got == want
    kept = committed(cut_dir)
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
    r = train.setup(c, str(tmp_path))

    def score(run, host_batch, completions, step):
        terms = train.score_rows(run, host_batch, completions, step)
        if step >= 2:
            terms["reward/total"] = np.full_like(terms["reward/total"], np.nan)
        return terms

    r.score_fn = score
    with pytest.raises(FloatingPointError, match=r"2 optimizer steps in a row .* step 3") as e:
        train.train_loop(r)
    assert "The last checkpoint (step 3) is intact" in str(e.value)
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [m["bad_step"] for m in rows] == [0, 0, 1, 1]
    assert [m["bad_steps_total"] for m in rows] == [0, 0, 1, 2]
    assert rows[2]["loss"] is None  # NaN, written as null
    # the loop's blocked time of each save, reported with the next step
    assert "time/checkpoint" not in rows[0] and all(m["time/checkpoint"] > 0 for m in rows[1:])
    assert committed(str(tmp_path)) == [1, 2, 3]  # nothing saved after the second bad step
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
