"""The training job's entry point: flags, multi-process start-up, one call.

    python -m visionr1_jax.main --config=configs/demo_cpu.py --workdir=/tmp/visionr1_demo
    python -m visionr1_jax.main --config=configs/tpu_v4_64.py --workdir=gs://BUCKET/run \\
        --config.grpo.beta=0.01

On a Cloud TPU VM pod slice every host runs the same command and `jax.distributed` finds its
peers by itself; elsewhere (a local multi-process test) pass `--coordinator_address`,
`--num_processes` and `--process_id`. The config and the paths it names (checkpoint, data,
workdir) are checked before anything starts (`preflight.check`): a mistake is one line,
`error: <key>=<value>: <problem>`, and exit status 2 (`cli.run`; README, "Common mistakes").
The libraries' INFO logs are off unless `--verbosity=info`. A config with an `experiment`
section runs that experiment's stages (`experiment.run`: `make demo`'s SFT → evaluation →
GRPO vs more SFT → table), any other the training job (`train.run`).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from visionr1_jax import cli, experiment, host, preflight, train

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
        raise preflight.UsageError(f"unexpected arguments: {argv[1:]}")
    config = preflight.check(_CONFIG.value, _WORKDIR.value)
    host.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    job = experiment.run if "experiment" in config else train.run
    job(config, _WORKDIR.value)


if __name__ == "__main__":
    cli.run(main)
