"""The training job's entry point: flags, multi-process start-up, one call.

    python -m visionr1_jax.main --config=configs/demo_cpu.py --workdir=/tmp/visionr1_demo
    python -m visionr1_jax.main --config=configs/tpu_v4_64.py --workdir=gs://BUCKET/run \\
        --config.grpo.beta=0.01

On a Cloud TPU VM pod slice every host runs the same command and `jax.distributed` finds its
peers by itself; elsewhere (a local multi-process test) pass `--coordinator_address`,
`--num_processes` and `--process_id`. The config is validated before anything starts. A
config with an `experiment` section runs that experiment's stages (`experiment.run`:
`make demo`'s SFT → evaluation → GRPO vs more SFT → table), any other the training job
(`train.run`).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from visionr1_jax import config_lib, experiment, host, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for run outputs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (explicit multi-process launch)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the launch.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_lib.validate(_CONFIG.value)
    host.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    job = experiment.run if "experiment" in config else train.run
    job(config, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
