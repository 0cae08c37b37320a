"""``tfds`` command line without TensorFlow.

The stock ``tfds`` entry point imports its ``convert_format`` and ``build_croissant`` commands,
which need TensorFlow / mlcroissant at import time. This module stands those in with stubs and
runs the real CLI, so ``tfds build`` works on array_record builders::

    python -m visionr1_jax.data.tfds_cli build synthetic_shapes \\
        --imports visionr1_jax.data.builders --config detection \\
        --data_dir ~/tensorflow_datasets --file_format array_record
    python -m visionr1_jax.data.tfds_cli build coco_detection \\
        --imports visionr1_jax.data.builders --manual_dir /data/coco --file_format array_record

``prepare`` (this module's own command) builds the dataset of a RUN config, for the datasets
made from the config alone (``coco_format``: the user's COCO-format files; ``synthetic_shapes``),
with the run's ``--config`` and overrides. Single-process runs do this on first use; a
multi-process run needs it done once beforehand, into a ``data_dir`` every host reads::

    python -m visionr1_jax.data.tfds_cli prepare \\
        --config=configs/coco_format_example.py:annotations=/d/train.json,images=/d/images \\
        --config.data.data_dir=gs://bucket/tensorflow_datasets
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types

from absl import flags, logging
from ml_collections import config_flags

from visionr1_jax.data import config as data_config_lib
from visionr1_jax.data import pipeline

_OPTIONAL = {
    # command module -> the package it needs at import time
    "tensorflow_datasets.scripts.cli.convert_format": "tensorflow",
    "tensorflow_datasets.scripts.cli.croissant": "mlcroissant",
}


def _stub(module: str, needs: str) -> None:
    if importlib.util.find_spec(needs) is not None or module in sys.modules:
        return

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Args:
        """A tfds command that needs a package which is not installed."""

        def execute(self) -> None:
            raise SystemExit(f"this tfds command needs {needs!r}, which is not installed")

    stub = types.ModuleType(module)
    stub.Args = Args
    stub.CmdArgs = Args
    sys.modules[module] = stub


def prepare(argv: list[str]) -> None:
    """``prepare --config=CONFIG[:ARGS] [--config.data.KEY=VALUE ...]``: builds (unless built)
    the dataset of the run config's ``data`` section and opens its training and evaluation
    splits (``argv[0]`` is the program name)."""
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "the run config file[:args]", flag_values=flag_values, sys_argv=argv
    )
    flag_values(argv)
    if flag_values.config is None:
        raise SystemExit("prepare needs --config=path/to/config.py[:args]")
    data = flag_values.config.data
    logging.set_verbosity(logging.INFO)
    data_config_lib.validate_data_config(data)
    if data.name not in ("coco_format", "synthetic_shapes"):
        raise SystemExit(
            f"prepare builds coco_format and synthetic_shapes; build {data.name} with "
            "python -m visionr1_jax.data.tfds_cli build (see its --help)"
        )
    for split in dict.fromkeys(s for s in (data.split, data.eval_split) if s):
        source = pipeline.open_source(data, split, build_synthetic=True)
        print(f"{data.name} {split}: {len(source)} records")


def main() -> None:
    if sys.argv[1:2] == ["prepare"]:
        prepare([sys.argv[0], *sys.argv[2:]])
        return
    for module, needs in _OPTIONAL.items():
        _stub(module, needs)
    # tfds's CLI imports its commands (TensorFlow, mlcroissant) at import time, so it comes
    # after the stubs above stand in for the missing ones
    from tensorflow_datasets.scripts.cli import main as tfds_main  # lazy: after the stubs

    tfds_main.launch_cli()


if __name__ == "__main__":
    main()
