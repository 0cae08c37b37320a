"""README's "Common mistakes" table, each row run as a user runs it (issue 29).

The rows are read from README.md, so the table and the tests stay in step. Each row's command
runs in a folder that holds the row's paths (`configs/` linked to the repository's; the
`models/...`, `tfds` and `runs/done` of `make_tree`) and must

- exit with status 2;
- print exactly one line on stderr, the row's message (no warning, no log line, no traceback)
  and nothing on stdout;
- compile nothing: no jax compilation event in the process (a `jax.monitoring` listener), and
  no compile log although `JAX_LOG_COMPILES=1` makes every compilation log a warning;
- write nothing: the folder's files and folders are the same before and after.

To stay fast, the rows run as forked children of one helper process (this file run as a
script) that imported the commands' modules once: each child is a process of its own that runs
the command's module as `__main__` with the row's arguments (what `python -m` does), its
stdout and stderr captured at the file descriptors, its exit status from `waitpid`. The rows
of `FRESH` also run as plain `python -m ...` subprocesses, showing the helper changes nothing.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import re
import runpy
import shlex
import subprocess
import sys
import time
import traceback

import jax
import pytest

from visionr1_jax import cli, config_lib, fs, preflight

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROGRAMS = {
    "main": "visionr1_jax.main",
    "evaluate": "visionr1_jax.evaluate",
    "export": "visionr1_jax.tools.export",
}
# Rows also run in a fresh interpreter: main (a config value, a flag), evaluate, export.
FRESH = (
    "a value out of range",
    "a value of the wrong type",
    "a dataset not built under `data.data_dir`",
    "exporting a run that has no checkpoint",
)
# Imported by the helper before it forks: every module the commands import (most of their
# start-up time). A child runs its command's module afresh as `__main__` (`visionr1_jax.main`,
# which defines its flags on import, is not preloaded; a preloaded one is dropped first).
PRELOAD = ("visionr1_jax.experiment", "visionr1_jax.evaluate", "visionr1_jax.tools.export")
CONTROL = "control: one jit"  # a case that compiles, to show the compile check sees it
DEBUG_ARGS = ("main --config=configs/demo_cpu.py --workdir=runs/x --config.grpo.beta=-1 "
              "--verbosity=debug")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Row:
    mistake: str
    command: str
    message: str

    @property
    def argv(self) -> list[str]:
        program, *args = shlex.split(self.command)
        return [PROGRAMS[program], *args]


def readme_rows() -> list[Row]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Common mistakes\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| mistake |"):
            continue
        mistake, command, message = (c.strip() for c in line.strip().strip("|").split(" | "))
        assert command[0] == command[-1] == message[0] == message[-1] == "`", line
        rows.append(Row(mistake, command[1:-1], message[1:-1]))
    return rows


def make_tree(folder: pathlib.Path) -> None:
    """The paths the rows name, relative to `folder` (each command's working directory)."""
    qwen = json.dumps({"model_type": "qwen2_5_vl"})
    files = {
        "models/truncated/config.json": '{"model_type": "qwen2_5_vl",',
        "models/llama/config.json": json.dumps({"model_type": "llama"}),
        "models/no_weights/config.json": qwen,
        "models/no_weights/tokenizer.json": "{}",
        "models/Qwen2.5-VL-7B-Instruct/config.json": qwen,
        "models/Qwen2.5-VL-7B-Instruct/model.safetensors": "",
        "models/Qwen2.5-VL-7B-Instruct/tokenizer.json": "{}",
    }
    folder.mkdir(parents=True)
    (folder / "configs").symlink_to(ROOT / "configs")
    for name in ("models/empty", "tfds", "runs/done/checkpoints/1", "runs/done/checkpoints/2"):
        (folder / name).mkdir(parents=True)
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def tree(folder: str | pathlib.Path) -> set[str]:
    """Every file and folder under `folder` (not following the `configs` link)."""
    out = set()
    for parent, dirs, files in os.walk(folder):
        out.update(os.path.relpath(os.path.join(parent, n), folder) for n in dirs + files)
    return out


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict[str, dict]]:
    """{mistake: {"forked": result, "fresh": result}} for every row, plus the control and the
    debug case; a result: exit `code`, `stdout`, `stderr`, `created` paths, `compiles`."""
    rows = readme_rows()
    base = tmp_path_factory.mktemp("mistakes")
    forked = base / "forked"
    make_tree(forked)
    cases = {r.mistake: r.argv for r in rows}
    cases[CONTROL] = [CONTROL]
    cases["debug"] = Row("", DEBUG_ARGS, "").argv
    (base / "cases.json").write_text(json.dumps(cases))
    helper = subprocess.Popen(
        [sys.executable, __file__, str(base / "cases.json"), str(base / "forked.json")],
        cwd=forked, env=env(),
    )  # fmt: skip
    fresh = {}
    for i, row in enumerate(r for r in rows if r.mistake in FRESH):
        folder = base / f"fresh{i}"
        make_tree(folder)
        before = tree(folder)
        proc = subprocess.Popen(
            [sys.executable, "-m", *row.argv], cwd=folder, env=env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        fresh[row.mistake] = (proc, folder, before)
    out: dict[str, dict[str, dict]] = {}
    for mistake, (proc, folder, before) in fresh.items():
        stdout, stderr = proc.communicate(timeout=300)
        created = sorted(tree(folder) ^ before)
        result = {"code": proc.returncode, "stdout": stdout, "stderr": stderr, "created": created}
        out[mistake] = {"fresh": result}
    assert helper.wait(timeout=300) == 0
    for mistake, result in json.loads((base / "forked.json").read_text()).items():
        out.setdefault(mistake, {})["forked"] = result
    return out


def test_the_table_covers_every_command_and_the_fresh_rows():
    rows = readme_rows()
    assert {r.argv[0] for r in rows} == set(PROGRAMS.values())
    assert set(FRESH) <= {r.mistake for r in rows}
    assert len({r.mistake for r in rows}) == len(rows) >= 15


@pytest.mark.parametrize("row", readme_rows(), ids=lambda r: r.mistake)
def test_a_common_mistake_is_one_line_and_exit_status_2(results, row):
    runs = results[row.mistake]
    assert set(runs) == ({"forked", "fresh"} if row.mistake in FRESH else {"forked"})
    for how, r in runs.items():
        assert r["stderr"] == row.message + "\n", (how, r["stderr"][-3000:])
        assert (r["code"], r["stdout"], r["created"]) == (2, "", []), (how, r)
        assert r.get("compiles", 0) == 0, (how, r)


def test_the_compile_check_sees_a_compilation(results):
    control = results[CONTROL]["forked"]
    assert control["code"] == 0 and control["compiles"] > 0, control
    assert "Compiling" in control["stderr"], control  # JAX_LOG_COMPILES logs it


def test_debug_verbosity_prints_the_traceback_then_the_line(results):
    r = results["debug"]["forked"]
    lines = r["stderr"].splitlines()
    assert r["code"] == 2 and lines[0] == "Traceback (most recent call last):", r
    assert "UsageError: grpo.beta=-1.0 must be a number >= 0" in lines[-2], r
    assert lines[-1] == "error: grpo.beta=-1.0 must be a number >= 0", r
    assert (r["created"], r["compiles"]) == ([], 0), r


def test_preflight_beyond_the_table(tmp_path):
    """The checks the table has no row for, in-process."""
    tmp_path = tmp_path / "tree"
    make_tree(tmp_path)
    models = tmp_path / "models"
    good = str(models / "Qwen2.5-VL-7B-Instruct")
    preflight.check_hf_checkpoint("model.checkpoint", good)
    sharded = models / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}})
    )
    (sharded / "model-1.safetensors").write_text("")
    for problem in (
        "model.safetensors.index.json names model-2.safetensors, which is missing",
        "no tokenizer (tokenizer.json, or vocab.json and merges.txt)",
    ):
        with pytest.raises(preflight.UsageError, match=re.escape(f"={sharded}: {problem}")):
            preflight.check_hf_checkpoint("model.checkpoint", str(sharded))
        (sharded / "model-2.safetensors").write_text("")  # on to the next check
    (sharded / "vocab.json").write_text("{}")
    (sharded / "merges.txt").write_text("")
    preflight.check_hf_checkpoint("model.checkpoint", str(sharded))

    # The workdir: a file, or under one, is no folder; one to make under a folder is fine.
    preflight.check_workdir("--workdir", str(tmp_path / "runs" / "new" / "deeper"))
    file = tmp_path / "models" / "llama" / "config.json"
    with pytest.raises(preflight.UsageError, match=r"config\.json: not a folder"):
        preflight.check_workdir("--workdir", str(file))
    with pytest.raises(preflight.UsageError, match=re.escape(f"cannot be made: {file} is a file")):
        preflight.check_workdir("--workdir", str(file / "run"))

    # evaluate --checkpoint: base (the config's model), a step, a folder (not model.checkpoint)
    config = config_lib.load_config(str(ROOT / "configs" / "demo_cpu.py"))
    run = str(tmp_path / "runs" / "done")
    for flag in (None, "base", "2", good):
        preflight.check_evaluation(config, run, flag)
    config.model.checkpoint = "gs://YOUR_BUCKET/model"
    preflight.check_evaluation(config, run, good)
    with pytest.raises(preflight.UsageError, match="YOUR_BUCKET is a placeholder"):
        preflight.check_evaluation(config, run, "base")

    # A dataset built under data_dir (a version folder with dataset_info.json) passes.
    data = config_lib.load_config(str(ROOT / "configs" / "eval_coco.py")).data
    data.data_dir = str(tmp_path / "tfds")
    with pytest.raises(preflight.UsageError, match="coco_detection/all is not built there"):
        preflight.check_dataset(data)
    (tmp_path / "tfds" / "coco_detection" / "all" / "1.0.0").mkdir(parents=True)
    (tmp_path / "tfds" / "coco_detection" / "all" / "1.0.0" / "dataset_info.json").write_text("{}")
    preflight.check_dataset(data)


def test_preflight_reads_gcs(gcs, tmp_path):
    """The same checks on `gs://` paths (the GCS emulator of `conftest.gcs`)."""
    make_tree(tmp_path / "tree")
    (tmp_path / "tree" / "runs" / "done" / "checkpoints" / "1" / "x").write_text("")
    (tmp_path / "tree" / "tfds" / "coco_detection" / "all" / "1.0.0").mkdir(parents=True)
    (tmp_path / "tree" / "tfds" / "coco_detection" / "all" / "1.0.0" / "dataset_info.json").touch()
    (tmp_path / "tree" / "models" / "empty" / "README").write_text("")  # no empty folder on GCS
    root = gcs.prefix("tree")
    fs.copy_tree(str(tmp_path / "tree" / "models"), fs.join(root, "models"))
    fs.copy_tree(str(tmp_path / "tree" / "runs"), fs.join(root, "runs"))
    fs.copy_tree(str(tmp_path / "tree" / "tfds"), fs.join(root, "tfds"))
    preflight.check_hf_checkpoint(
        "model.checkpoint", fs.join(root, "models/Qwen2.5-VL-7B-Instruct")
    )
    assert preflight.check_run(fs.join(root, "runs/done"), 1) == [1]
    data = config_lib.load_config(str(ROOT / "configs" / "eval_coco.py")).data
    data.data_dir = fs.join(root, "tfds")
    preflight.check_dataset(data)
    for name, problem in (
        ("nonexistent", "no such folder"),
        ("empty", "no config.json"),
        ("truncated", "config.json is not JSON"),
        ("no_weights", "no weights"),
    ):
        path = fs.join(root, "models", name)
        with pytest.raises(preflight.UsageError, match=re.escape(f"{path}: {problem}")):
            preflight.check_hf_checkpoint("model.checkpoint", path)
    with pytest.raises(preflight.UsageError, match="no such folder"):
        preflight.check_run(fs.join(root, "runs/sft"), None, "model.init_from")
    data.data_dir = fs.join(root, "nothing")
    with pytest.raises(preflight.UsageError, match="coco_detection/all is not built there"):
        preflight.check_dataset(data)


# --- The helper: python tests/test_errors.py CASES_JSON RESULTS_JSON (cwd: the rows' folder) --


def _child(argv: list[str], stdout: str, stderr: str, compiles: str) -> None:
    """In the forked process: stdout and stderr to files, every jax compilation event counted
    in `compiles`, then the module as `__main__` (as `python -m`), ended with the exit status
    Python gives its SystemExit or exception. Never returns: `os._exit` after flushing skips
    the interpreter's teardown (1.7 s with torch loaded; the `FRESH` rows go through it)."""
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)

    def count(event: str, *_args, **_kwargs) -> None:
        if event.startswith("/jax/core/compile"):
            with open(compiles, "a") as f:
                f.write(event + "\n")

    jax.monitoring.register_event_duration_secs_listener(count)
    code = 0
    try:
        if argv[0] == CONTROL:  # a command that compiles, with the commands' console
            sys.argv = ["control"]
            cli.run(lambda _: print(jax.jit(lambda x: x + 1)(1)))
        sys.argv = list(argv)
        sys.modules.pop(argv[0], None)  # run afresh, as `python -m` does
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as the interpreter treats it
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _helper(cases_json: str, results_json: str) -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    out = {}
    capture = os.path.dirname(os.path.abspath(results_json))
    for name, argv in json.loads(pathlib.Path(cases_json).read_text()).items():
        files = [os.path.join(capture, f"case.{k}") for k in ("stdout", "stderr", "compiles")]
        for path in files:
            if os.path.exists(path):
                os.unlink(path)
        before, start = tree("."), time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(argv, *files)
        _, status = os.waitpid(pid, 0)
        stdout, stderr, compiles = (
            pathlib.Path(p).read_text() if os.path.exists(p) else "" for p in files
        )
        out[name] = {
            "code": os.waitstatus_to_exitcode(status),
            "stdout": stdout,
            "stderr": stderr,
            "created": sorted(tree(".") ^ before),
            "compiles": len(compiles.splitlines()),
            "seconds": round(time.monotonic() - start, 2),
        }
    pathlib.Path(results_json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    _helper(*sys.argv[1:])
