"""A config file imports ml_collections and the jax-free config sections only.

Each ``configs/*.py`` (its default variant, and ``demo_cpu.py:experiment=False``) is loaded and
validated in a fresh interpreter, which then says how long that took and which heavy libraries
it imported: none may be (reading and checking a config must not start jax, the trainer or a
dataset library), and the load plus validation takes well under a second.
"""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))
SPECS = [*CONFIGS, "demo_cpu.py:experiment=False"]
HEAVY = ("jax", "flax", "optax", "transformers", "tensorflow_datasets", "torch")

# argv: the config spec, HEAVY as JSON. Prints one JSON line: seconds to load and validate, and
# which of HEAVY are in sys.modules afterwards (importing config_lib itself included).
_PROBE = """
import json, sys, time
from visionr1_jax import config_lib
t0 = time.perf_counter()
config = config_lib.load_config(sys.argv[1])
config_lib.validate(config)
dt = time.perf_counter() - t0
print(json.dumps({"dt": dt, "imported": [m for m in json.loads(sys.argv[2]) if m in sys.modules]}))
"""


def probe(spec: str, root: pathlib.Path = ROOT) -> dict:
    """Loads and validates ``configs/{spec}`` under ``root`` in a fresh interpreter: {"dt":
    seconds, "imported": the HEAVY modules it imported}."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, f"configs/{spec}", json.dumps(HEAVY)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"configs/{spec} did not load:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spec", SPECS, ids=SPECS)
def test_config_loads_without_jax(spec):
    result = probe(spec)
    took = f"load and validate: {result['dt']:.2f} s"
    assert not result["imported"], f"configs/{spec} imports {result['imported']} ({took})"
    # Load plus validation takes milliseconds when jax-free; a config that drags in jax (and
    # the trainer with it) takes several seconds, so 1 s separates the two with a wide margin.
    assert result["dt"] < 1.0, f"configs/{spec} is slow to read ({took})"
