"""The command lines' common start: a console a person reads, and mistakes as one line.

`run(main)` is absl's `app.run(main)` for `python -m visionr1_jax.main`,
`python -m visionr1_jax.evaluate` and the tools, with two changes.

**The console.** Without `--verbosity` (`-v`) the libraries' INFO lines are off (orbax writes
dozens per checkpoint; tfds, jax and absl more). This package's own INFO lines (the train
step's memory, "resuming from checkpoint step N", "run finished: N steps") print as plain
lines, and a warning repeated word for word prints once. Progress bars, stage banners and
result tables are untouched; a log line clears and redraws the progress bars instead of
breaking one. `--verbosity=info` (`-v 0`) gives absl's whole log back in its format,
`--verbosity=debug` (`-v 1`) adds DEBUG; the flag takes level names besides absl's integers.

**One-line errors.** A mistake the command line can name exits with status 2 and one line on
stderr, `error: <key>=<value>: <problem>`, before anything compiles or is written: a flag or
config override that does not parse, an unknown config key, a config file that does not load,
a required flag left out, and what `preflight` finds (`preflight.UsageError`: a value
`config_lib.validate` rejects, a missing or malformed checkpoint, a dataset not built, ...).
With `--verbosity=debug` the traceback comes first. Anything else (a bad data record, a bug)
stays a normal traceback.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import is_config_flag  # public, not re-exported
from tqdm import tqdm

from visionr1_jax import config_lib, preflight

FLAGS = flags.FLAGS
LEVELS = {"debug": 1, "info": 0, "warning": -1, "error": -2, "fatal": -3}  # absl's verbosity
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def run(main: Callable[[list[str]], Any]) -> NoReturn:
    """`app.run(main)` with the console and the one-line errors of the module docstring."""
    FLAGS["verbosity"].parser = _LevelParser()
    app.run(lambda argv: _call(main, argv), flags_parser=_parse_flags)


class _LevelParser(flags.IntegerParser):
    """absl's `--verbosity` parser, taking the names of `LEVELS` too."""

    def parse(self, argument: Any) -> int:
        if isinstance(argument, str) and argument.lower() in LEVELS:
            return LEVELS[argument.lower()]
        return super().parse(argument)


def _call(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
    try:
        return main(argv)
    except preflight.UsageError as e:
        debug = FLAGS.verbosity >= LEVELS["debug"]
        _exit(str(e), traceback.format_exc() if debug else None)


def _exit(line: str, detail: str | None = None) -> NoReturn:
    if detail:
        sys.stderr.write(detail.rstrip() + "\n")
    sys.stderr.write("error: " + re.sub(r"\s*\n\s*", " ", line.strip()) + "\n")
    sys.exit(2)


# --- Flags ------------------------------------------------------------------------------------


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with a mistake as one line (exit 2), then the console's levels."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        _exit(_flag_error(str(e)), str(e) if _debug_in(argv) else None)
    except (AttributeError, KeyError, OSError):
        # ml_collections fails this way (not with a flags.Error) on an override of a key the
        # config does not have, or an override of a config file that does not load.
        line = _config_mistake(argv)
        if line is None:
            raise
        _exit(line)
    for name in _config_flag_names():
        try:
            getattr(FLAGS[name].value, "keys", None)  # a config file that did not load raises
        except OSError as e:
            spec = config_flags.get_config_filename(FLAGS[name])
            _exit(_config_mistake(argv) or f"--{name}={spec}: {str(e).splitlines()[0]}")
    _set_up_console()
    return rest


def _flag_error(message: str) -> str:
    """absl's message of a flag that does not parse, as one line `--flag=value: problem`."""
    required = re.search(r"Flag --(\S+) must have a value other than None", message)
    if required:
        return f"--{required.group(1)} is required"
    head, _, rest = message.partition("\n")
    head = re.sub(r"^flag ", "", head)
    if "Traceback (most recent call last)" in rest:  # the config file's get_config raised
        last = [line.strip() for line in rest.splitlines() if line.strip()][-1]
        head = re.sub(r":?\s*Error whilst parsing config file:?$", "", head)
        last = re.sub(r"^[\w.]+: ", "", last)  # the exception's class
        return f"{head}: {last}"
    return f"{head} {rest}"


def _config_flag_names() -> list[str]:
    return [name for name in FLAGS if is_config_flag(FLAGS[name])]


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value `argv` gives the flag `name` (`--name=v`, `-name=v` or `--name v`)."""
    value = None
    for i, arg in enumerate(argv[1:], 1):
        found = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg, re.S)
        if found:
            value = found.group(2) if found.group(1) else (argv[i + 1 : i + 2] or [None])[0]
    return value


def _debug_in(argv: list[str]) -> bool:
    value = _flag_value(argv, "verbosity") or _flag_value(argv, "v")
    try:
        return value is not None and _LevelParser().parse(value) >= LEVELS["debug"]
    except ValueError:
        return False


def _config_mistake(argv: list[str]) -> str | None:
    """What makes a config flag fail: its file missing, or an override naming a key the config
    does not have (None: neither)."""
    for name in _config_flag_names():
        spec = _flag_value(argv, name)
        if spec is None:
            continue
        if not os.path.isfile(spec.partition(":")[0]):  # a config file is a local module
            return f"--{name}={spec}: no such file"
        config = config_lib.load_config(spec)
        for i, arg in enumerate(argv[1:], 1):
            found = re.fullmatch(rf"--?(no)?{re.escape(name)}\.([\w.]+)(=(.*))?", arg, re.S)
            if not found:
                continue
            problem = _missing_key(config, found.group(2))
            if problem:
                value = found.group(4) if found.group(3) else (argv[i + 1 : i + 2] or [""])[0]
                return f"--{name}.{found.group(2)}={value}: {problem}"
    return None


def _missing_key(config: ml_collections.ConfigDict, path: str) -> str | None:
    """Why `path` (`a.b.c`) is not a key of `config`, with the nearest key (None: it is)."""
    node, parts = config, path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the config"
        if not isinstance(node, ml_collections.ConfigDict):
            return f"{where} is a value, not a section"
        if part not in node:
            known = sorted(node.keys())
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"its keys: {known}"
            return f"{where} has no key {part!r}; {hint}"
        node = node[part]
    return None


# --- Console ----------------------------------------------------------------------------------


def _set_up_console() -> None:
    handler = absl_logging.get_absl_handler()
    handler.python_handler.setStream(_BarSafeStderr())
    if FLAGS["verbosity"].present:
        return  # the level asked for, everything in absl's format
    # INFO reaches the handler, whose filter keeps only this package's INFO lines.
    FLAGS.verbosity = LEVELS["info"]
    handler.addFilter(_ConsoleFilter())
    handler.setFormatter(_ConsoleFormatter())


def _ours(record: logging.LogRecord) -> bool:
    return os.path.abspath(record.pathname).startswith(_PACKAGE)


class _ConsoleFilter(logging.Filter):
    """INFO from this package only; each distinct warning once."""

    def __init__(self):
        super().__init__()
        self._seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return record.levelno >= logging.INFO and _ours(record)
        if record.levelno == logging.WARNING:
            key = (record.pathname, record.lineno, record.getMessage())
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


class _ConsoleFormatter(absl_logging.PythonFormatter):
    """This package's INFO lines as plain text; warnings and errors in absl's format."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno < logging.WARNING and _ours(record):
            return record.getMessage()
        return super().format(record)


class _BarSafeStderr:
    """stderr for log lines: tqdm's progress bars are cleared before a line and redrawn after
    it (`tqdm.write`), not broken by it."""

    def write(self, text: str) -> None:
        tqdm.write(text, file=sys.stderr, end="")

    def flush(self) -> None:
        sys.stderr.flush()

    def close(self) -> None:  # sys.stderr is not ours to close
        pass
