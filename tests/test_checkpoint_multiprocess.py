"""A 2-process `jax.distributed` run (2 x 4 CPU devices on localhost) killed and resumed
(issue #11): both processes SIGKILLed after the first commit, both restarted, both resume, a
SIGTERM to both stops both at the same step with one save, and the run ends bit-identical to
an uninterrupted one. The helpers and fixtures are test_checkpoint.py's; this test has its own
file so that `make test`'s workers (whole files each) run it beside that file's.
"""

from __future__ import annotations

import glob
import signal

import launch
from test_checkpoint import assert_same_runs, assets, ckpt, start

__all__ = ["assets", "ckpt"]  # fixtures used by name


# 2 processes x 4 CPU devices on localhost, data and fsdp across the processes (as the
# "procs" run of test_train_distributed.py); 4 prompts per host. Every start costs a full
# compilation: jax's persistent cache is written by process 0 only, and process 1's cache
# keys differ from process 0's (so it never hits), hence one restart and 3 steps.
MULTI_STEPS = 3
MULTI = {
    "total_steps": MULTI_STEPS,
    "log_rollouts": MULTI_STEPS,
    "data.batch_size": 8,
    "mesh.ici_parallelism": "(2,2,2)",
}


def test_killed_2_process_run_resumes_bit_identical(assets, tmp_path):
    """A 2-process run loses both processes (SIGKILL, as a preempted pod loses every host)
    right after its first checkpoint (step 2) is committed; the same command on both resumes
    from it on both; a SIGTERM to both as soon as they say so stops both after the same step
    (the last, 3) with one save, and both exit 0; the run ends bit-identical to an
    uninterrupted 2-process run (started first: the killed run's process 0 loads its
    programs from the cache)."""
    ref_dir, cut_dir = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    ref = start(assets, ref_dir, processes=2, devices=4, **MULTI)
    # Once the uninterrupted run has compiled (first checkpoint committed), the other starts:
    # its process 0 loads the programs from the cache (process 1 compiles, as at every start).
    ref.wait_for(lambda: launch.committed(ref_dir))
    cut = start(assets, cut_dir, processes=2, devices=4, **MULTI)
    cut.wait_for(lambda: launch.committed(cut_dir))
    cut.kill()
    saved = launch.committed(cut_dir)
    assert saved == [2], saved

    again = start(assets, cut_dir, processes=2, devices=4, **MULTI)
    again.wait_for(lambda: all("resuming from checkpoint step" in again.text(i) for i in (0, 1)))
    again.send_signal(signal.SIGTERM)
    assert again.wait() == [0, 0]
    for i in (0, 1):
        text = again.text(i)
        assert "resuming from checkpoint step 2 " in text, again.tails()
        assert "SIGTERM: stopped after step 3 (checkpoint saved)" in text, again.tails()
    assert launch.committed(cut_dir) == [2, 3]
    assert ref.wait() == [0, 0]

    assert_same_runs(cut_dir, ref_dir, assets["checkpoint"], MULTI_STEPS)
    data = glob.glob("process_*.json", root_dir=f"{cut_dir}/checkpoints/{MULTI_STEPS}/data")
    assert sorted(data) == ["process_0-of-2.json", "process_1-of-2.json"]
