"""``tfds`` command line without TensorFlow.

The stock ``tfds`` entry point imports its ``convert_format`` and ``build_croissant`` commands,
which need TensorFlow / mlcroissant at import time. This module stands those in with stubs and
runs the real CLI, so ``tfds build`` works on array_record builders::

    python -m visionr1_jax.data.tfds_cli build synthetic_shapes \\
        --imports visionr1_jax.data.builders --config detection \\
        --data_dir ~/tensorflow_datasets --file_format array_record
    python -m visionr1_jax.data.tfds_cli build coco_detection \\
        --imports visionr1_jax.data.builders --manual_dir /data/coco --file_format array_record
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types

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


def main() -> None:
    for module, needs in _OPTIONAL.items():
        _stub(module, needs)
    from tensorflow_datasets.scripts.cli import main as tfds_main

    tfds_main.launch_cli()


if __name__ == "__main__":
    main()
