"""The notebooks under ``experiments/`` execute top to bottom and write their plots.

Each runs in a fresh ``python3`` kernel (ipykernel of this interpreter's environment) with the
repo root as working directory and JAX on CPU; a failing cell raises ``CellExecutionError``
and fails the test. The executed copies stay in memory: the committed notebooks are never
rewritten, and must be committed without outputs.
"""

import json
import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "experiments"
CELL_TIMEOUT = 300  # seconds per cell; each notebook runs in well under a minute on 2 cores
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _execute(name: str, **env: str) -> nbformat.NotebookNode:
    """Executes ``experiments/<name>`` in memory; ``env`` is added to the kernel's environment."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},  # the kernel's working directory
    )
    client.execute(env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
    return nb


def _check_pngs(folder: pathlib.Path, names: list[str], since: float) -> None:
    for name in names:
        path = folder / name
        assert path.is_file(), f"{path} was not written"
        assert path.stat().st_mtime >= since - 1, f"{path} is stale"
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC, f"{path} is not a PNG"
        assert path.stat().st_size > 1000, f"{path} is nearly empty"


@pytest.mark.parametrize("name", ["reward_ablations.ipynb", "training_curves.ipynb"])
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_reward_ablations_executes():
    start = time.time()
    _execute("reward_ablations.ipynb")
    pngs = [
        "landscape_shift.png",
        "landscape_scale.png",
        "variants_side_by_side.png",
        "refinement_stages.png",
        "hacking_probes.png",
    ]
    _check_pngs(NOTEBOOKS / "plots", pngs, start)


def _write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def _grpo_rows() -> list[dict]:
    rows = []
    for step in range(1, 13):
        rows.append(
            {
                "step": step,
                "reward/total": 1.0 + step / 10,
                "reward/format": 0.9,
                "reward/recall": 0.3 + step / 40,
                "reward/precision": 0.4 + step / 50,
                "threshold/recall_tp": 0.5 if step < 8 else 0.75,
                "threshold/precision_lo": 0.5 if step < 8 else 0.75,
                "kl": 0.001 * step,
                "completion/length": 60 - step,
                "matched_iou": 0.6 + step / 100,
                "loss": 0.01,
            }
        )
        if step in (1, 6, 12):  # evaluation rows: separate lines at some steps
            rows.append(
                {
                    "step": step,
                    "eval/AP": 0.1 + step / 100,
                    "eval/AP50": 0.2 + step / 100,
                    "eval/AR100": 0.3,
                    "eval/matched_iou": 0.65,
                    "eval/parse_rate": 1.0,
                }
            )
    return rows


def _sft_rows() -> list[dict]:
    rows = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-5} for s in range(1, 9)]
    for row in rows[3::4]:  # evaluation keys on the same line as the training keys
        row.update({"eval/AP": 0.05, "eval/AP50": 0.1, "eval/AR100": 0.2, "eval/parse_rate": 0.9})
    return rows


def test_training_curves_executes(tmp_path):
    _write_jsonl(tmp_path / "grpo", _grpo_rows())
    _write_jsonl(tmp_path / "sft", _sft_rows())
    plots = tmp_path / "plots"
    start = time.time()
    _execute(
        "training_curves.ipynb",
        VISIONR1_RUNS=os.pathsep.join([str(tmp_path / "sft"), str(tmp_path / "grpo")]),
        VISIONR1_PLOTS=str(plots),
    )
    names = ["reward", "thresholds", "kl", "completion_length", "matched_iou", "loss", "eval"]
    _check_pngs(plots, [f"curves_{n}.png" for n in names], start)
    assert sorted(p.name for p in plots.iterdir()) == sorted(f"curves_{n}.png" for n in names)


def test_training_curves_fails_clearly_without_runs(tmp_path):
    with pytest.raises(CellExecutionError, match=r"without a metrics\.jsonl"):
        _execute(
            "training_curves.ipynb",
            VISIONR1_RUNS=str(tmp_path / "nothing"),
            VISIONR1_PLOTS=str(tmp_path / "plots"),
        )
