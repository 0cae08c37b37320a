"""The package reads in layers: a module imports from its own layer or the layers below it.

``LAYERS`` lists the layers bottom to top, as data; README's Layout section shows the same
order (keep the two in step). Pure source reading with ``ast``: nothing under ``visionr1_jax/``
is imported, so the checks take well under a second and still report on a tree whose modules
do not import. Over every module file under ``visionr1_jax/``:

1. each module is placed in exactly one layer of ``LAYERS`` (a new module must be placed);
2. no module imports a module of a higher layer;
3. no import cycle among the package's modules;
4. no module takes a private name (``_x``) of another package module;
5. the package's own imports are at module level, and a function-level third-party or
   standard-library import carries a comment on its line saying why (an optional heavy
   dependency, e.g. ``import matplotlib  # optional: only the experiment's plot needs it``).

Checks 2 and 3 count every import in a file: module level, inside functions, inside
``if TYPE_CHECKING:`` blocks; relative imports are resolved. ``from visionr1_jax import train``
imports ``visionr1_jax.train``; ``from visionr1_jax.data import x`` imports
``visionr1_jax.data.x`` when that is a module, else the package ``visionr1_jax.data`` (its
``__init__.py``); ``import visionr1_jax.data.builders`` imports that package.

Each check takes the repository root, so the last tests run them on small fake packages under
``tmp_path``: a correctly layered one passes and each planted violation is caught.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import itertools
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "visionr1_jax"

# The layers, bottom to top: README's Layout section shows the same order. A pattern is a module
# name (that module only) or ``name.**`` (that package and every module under it); a module
# belongs to the layer of its most specific pattern (a name beats a ``.**``, a deeper ``.**``
# beats a shallower one), which is how `data.tfds_cli` and `rewards.demo` leave their package's
# layer. Listed modules that do not exist (yet) are fine; an existing module must be listed.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "ground",
        (
            "visionr1_jax",
            "visionr1_jax.sections.**",
            "visionr1_jax.fs",
            "visionr1_jax.config_lib",
            "visionr1_jax.preflight",
            "visionr1_jax.cli",
            "visionr1_jax.data.**",
            "visionr1_jax.processing",
            "visionr1_jax.sharding",
            "visionr1_jax.host",
        ),
    ),
    (
        "kernels",
        (
            "visionr1_jax.grpo",
            "visionr1_jax.rewards.**",
            "visionr1_jax.sampler",
            "visionr1_jax.models.**",
            "visionr1_jax.eval_metrics",
        ),
    ),
    (
        "state",
        (
            "visionr1_jax.state",
            "visionr1_jax.loading",
            "visionr1_jax.checkpoint",
            "visionr1_jax.metrics",
            "visionr1_jax.render",
        ),
    ),
    (
        "stages",
        (
            "visionr1_jax.step",
            "visionr1_jax.scoring",
            "visionr1_jax.rollout",
            "visionr1_jax.sft",
            "visionr1_jax.evaluate",
        ),
    ),
    ("loop", ("visionr1_jax.train",)),
    (
        "entry",
        (
            "visionr1_jax.main",
            "visionr1_jax.experiment",
            "visionr1_jax.tools.**",
            "visionr1_jax.rewards.demo",
            "visionr1_jax.data.tfds_cli",
        ),
    ),
)

Layers = tuple[tuple[str, tuple[str, ...]], ...]


# --- Reading the package ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement of a module, resolved.

    ``targets``: the package modules it imports (empty for a third-party or standard-library
    import); ``external``: the top-level name of a third-party or standard-library import;
    ``scope``: the enclosing ``def``/``class`` (``""`` at module level, ``if``/``try`` blocks
    included); ``reason``: a comment on the statement's lines other than a linter directive.
    """

    line: int
    text: str
    targets: tuple[str, ...]
    external: str
    scope: str
    reason: bool


@dataclasses.dataclass(frozen=True)
class Module:
    name: str  # dotted; a package is named by its __init__.py
    path: str  # relative to the repository root, for messages
    imports: tuple[Import, ...]
    private_uses: tuple[tuple[int, str, str], ...]  # (line, what is written, the module owning it)


def _module_names(root: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


# Linter and type-checker directives: a comment holding only these says nothing about why.
_DIRECTIVE = re.compile(
    r"noqa(:\s*[A-Z]+\d+(\s*,\s*[A-Z]+\d+)*)?|type:\s*ignore(\[[^\]]*\])?"
    r"|pragma:\s*no\s*cover|fmt:\s*(on|off|skip)|isort:\s*skip"
)


def _says_why(lines: list[str]) -> bool:
    """Whether an import statement's source lines carry a comment besides linter directives (an
    import statement holds no string literal, so its first ``#`` starts the comment)."""
    comments = (line.partition("#")[2] for line in lines)
    return any(re.search(r"\w", _DIRECTIVE.sub("", c)) for c in comments)


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but a chain of names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)


def _outer_parts(scope: ast.AST) -> list[ast.AST]:
    """The parts of a def/class/lambda evaluated in the enclosing scope."""
    if isinstance(scope, ast.ClassDef):
        return [*scope.decorator_list, *scope.bases, *scope.keywords]
    if not isinstance(scope, _SCOPES):
        return []
    a = scope.args
    args = [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]
    parts = [*a.defaults, *a.kw_defaults, *(x.annotation for x in args if x is not None)]
    if not isinstance(scope, ast.Lambda):
        parts += [*scope.decorator_list, scope.returns]
    return [p for p in parts if p is not None]


def _local_nodes(scope: ast.AST):
    """The nodes of one scope's body, not descending into nested scopes' bodies."""
    todo = [scope.body] if isinstance(scope, ast.Lambda) else list(scope.body)
    while todo:
        node = todo.pop()
        yield node
        todo.extend(_outer_parts(node) if isinstance(node, _SCOPES) else ast.iter_child_nodes(node))


class _Reader:
    """Resolves one module's imports and the names its imports bind, scope by scope."""

    def __init__(self, name: str, is_package: bool, modules: set[str]):
        self.name, self.modules = name, modules
        self.package = name if is_package else name.rpartition(".")[0]

    def base(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.package.split(".")
        parts = parts[: len(parts) - (node.level - 1)]
        return ".".join([*parts, *([node.module] if node.module else [])])

    def resolve(self, node: ast.Import | ast.ImportFrom):
        """(package modules imported, external top-level name, {bound name: package module},
        [(line, private name, its module)])."""
        targets, bound, private = [], {}, []
        if isinstance(node, ast.Import):
            external = ""
            for alias in node.names:
                if not _in_package(alias.name):
                    external = external or alias.name.partition(".")[0]
                    continue
                targets.append(alias.name)
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[PACKAGE] = PACKAGE
            return targets, external, bound, private
        base = self.base(node)
        if not _in_package(base):
            return targets, base.partition(".")[0], bound, private
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.modules:
                targets.append(sub)
                bound[alias.asname or alias.name] = sub
            else:
                targets.append(base)
            if _is_private(alias.name) and base != self.name:
                private.append((node.lineno, f"{base}.{alias.name}", base))
        return list(dict.fromkeys(targets)), "", bound, private

    def bindings(self, scope: ast.AST) -> dict[str, str | None]:
        """Names bound in ``scope``: to a package module by an import, else to None."""
        out: dict[str, str | None] = {}
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            a = scope.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    out[arg.arg] = None
        for node in _local_nodes(scope):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                out.setdefault(node.id, None)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                out.setdefault(node.name, None)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                out.setdefault(node.name, None)
            elif isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    out[alias.asname or alias.name.partition(".")[0]] = None
                out.update(self.resolve(node)[2])
        return out

    def private_attributes(self, tree: ast.Module, imports) -> list[tuple[int, str, str]]:
        """``m._x`` where ``m`` names a package module in the scope it is read in."""
        found = []
        names = {n for node in imports for n in self.resolve(node)[2]}
        if not any(
            isinstance(node, ast.Attribute)
            and _is_private(node.attr)
            and (_dotted(node.value) or [""])[0] in names
            for node in ast.walk(tree)
        ):
            return found  # the scope by scope reading only where it can find something

        def walk(scope: ast.AST, env: collections.ChainMap):
            env = env.new_child(self.bindings(scope))
            for node in _local_nodes(scope):
                if isinstance(node, _SCOPES):
                    # a class body's names are not visible inside its methods
                    walk(node, env.parents if isinstance(scope, ast.ClassDef) else env)
                if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                    continue
                chain = _dotted(node.value)
                module = env.get(chain[0]) if chain else None
                for part in (chain or [])[1:]:
                    module = f"{module}.{part}" if f"{module}.{part}" in self.modules else None
                    if module is None:
                        break
                if module and module != self.name:
                    found.append((node.lineno, ".".join([*chain, node.attr]), module))

        walk(tree, collections.ChainMap())
        return found


def _scoped_imports(tree: ast.Module):
    """(import node, the qualified name of its innermost enclosing def/class, "" for none)."""

    def walk(node: ast.AST, scope: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, scope
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                yield from walk(child, f"{scope}.{child.name}" if scope else child.name)
            elif isinstance(child, ast.stmt | ast.excepthandler | ast.match_case):
                yield from walk(child, scope)  # an expression holds no import statement

    yield from walk(tree, "")


@functools.cache
def read_package(root: pathlib.Path) -> dict[str, Module]:
    """Every module under ``root / PACKAGE``, by dotted name, its imports resolved."""
    files = _module_names(root)
    modules = {}
    for name, path in files.items():
        source = path.read_text()
        tree = ast.parse(source, filename=str(path))
        reader = _Reader(name, path.name == "__init__.py", set(files))
        lines = source.splitlines()
        imports, private = [], []
        scoped = list(_scoped_imports(tree))
        for node, scope in scoped:
            targets, external, _, taken = reader.resolve(node)
            private += taken
            imports.append(
                Import(
                    line=node.lineno,
                    text=ast.unparse(node),
                    targets=tuple(targets),
                    external=external,
                    scope=scope,
                    reason=_says_why(lines[node.lineno - 1 : node.end_lineno]),
                )
            )
        private += reader.private_attributes(tree, [node for node, _ in scoped])
        modules[name] = Module(
            name=name,
            path=path.relative_to(root).as_posix(),
            imports=tuple(sorted(imports, key=lambda i: i.line)),
            private_uses=tuple(sorted(set(private))),
        )
    return modules


# --- The checks: each returns one line per offence, `path:line: ...` ---------------------------


def _matches(pattern: str, name: str) -> tuple[int, int] | None:
    """How specifically ``pattern`` matches ``name`` (bigger is more specific), or None."""
    if pattern.endswith(".**"):
        prefix = pattern[:-3]
        if name == prefix or name.startswith(prefix + "."):
            return (prefix.count(".") + 1, 0)
        return None
    return (pattern.count(".") + 1, 1) if name == pattern else None


def placement(name: str, layers: Layers = LAYERS) -> list[int]:
    """The indices of the layers whose most specific pattern for ``name`` is the best one."""
    best: dict[int, tuple[int, int]] = {}
    for index, (_, patterns) in enumerate(layers):
        keys = [k for k in (_matches(p, name) for p in patterns) if k is not None]
        if keys:
            best[index] = max(keys)
    if not best:
        return []
    top = max(best.values())
    return [i for i, key in best.items() if key == top]


def layer_of(name: str, layers: Layers = LAYERS) -> int | None:
    found = placement(name, layers)
    return found[0] if len(found) == 1 else None


def check_placement(root: pathlib.Path, layers: Layers = LAYERS) -> list[str]:
    out = []
    for module in read_package(root).values():
        found = placement(module.name, layers)
        if not found:
            out.append(f"{module.path}: {module.name} is in no layer: add it to LAYERS")
        elif len(found) > 1:
            names = ", ".join(layers[i][0] for i in found)
            out.append(f"{module.path}: {module.name} is in {len(found)} layers ({names})")
    return out


def check_layers(root: pathlib.Path, layers: Layers = LAYERS) -> list[str]:
    out = []
    for module in read_package(root).values():
        own = layer_of(module.name, layers)
        if own is None:
            continue  # check_placement reports it
        for imp in module.imports:
            for target in imp.targets:
                theirs = layer_of(target, layers)
                if theirs is not None and theirs > own:
                    out.append(
                        f"{module.path}:{imp.line}: {module.name} ({layers[own][0]}) imports "
                        f"{target} ({layers[theirs][0]}): `{imp.text}`"
                    )
    return out


def import_graph(root: pathlib.Path) -> dict[str, dict[str, str]]:
    """{module: {imported package module: `path:line` of the first import of it}}."""
    modules = read_package(root)
    graph: dict[str, dict[str, str]] = {}
    for module in modules.values():
        edges = graph.setdefault(module.name, {})
        for imp in module.imports:
            for target in imp.targets:
                if target != module.name and target in modules:
                    edges.setdefault(target, f"{module.path}:{imp.line}")
    return graph


def _components(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []

    def visit(node: str):
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(out)


def check_cycles(root: pathlib.Path) -> list[str]:
    graph = import_graph(root)
    out = []
    for component in _components(graph):
        start = component[0]
        # the shortest cycle through `start`, breadth first inside its component
        previous: dict[str, str] = {}
        frontier = [start]
        while start not in previous:
            nxt = []
            for node in frontier:
                for target in sorted(graph[node]):
                    if target in component and target not in previous:
                        previous[target] = node
                        nxt.append(target)
            frontier = nxt
        chain = [start]
        while len(chain) == 1 or chain[-1] != start:
            chain.append(previous[chain[-1]])
        chain.reverse()
        where = ", ".join(graph[a][b] for a, b in itertools.pairwise(chain))
        line = f"{where}: import cycle {' -> '.join(chain)}"
        if len(component) > len(chain) - 1:
            line += f" (each of these reaches every other: {', '.join(component)})"
        out.append(line)
    return out


def check_private_names(root: pathlib.Path) -> list[str]:
    out = []
    for module in read_package(root).values():
        for line, written, owner in module.private_uses:
            out.append(f"{module.path}:{line}: {module.name} uses {written}, private to {owner}")
    return out


def check_function_imports(root: pathlib.Path) -> list[str]:
    out = []
    for module in read_package(root).values():
        for imp in module.imports:
            where = f"{module.path}:{imp.line}: `{imp.text}` inside {imp.scope}"
            if imp.scope and imp.targets:
                out.append(f"{where}: a package import, move it to the top")
            elif imp.scope and not imp.reason:
                stdlib = imp.external in sys.stdlib_module_names
                kind = "standard-library" if stdlib else "third-party"
                out.append(f"{where}: a {kind} import with no comment saying why")
    return out


def _assert_none(offences: list[str], what: str) -> None:
    if offences:
        pytest.fail(f"{len(offences)} {what}:\n" + "\n".join(offences), pytrace=False)


# --- The package ---------------------------------------------------------------------------


def test_every_module_is_in_exactly_one_layer():
    _assert_none(check_placement(ROOT), "modules not in exactly one layer of LAYERS")


def test_no_module_imports_from_a_higher_layer():
    _assert_none(check_layers(ROOT), "imports from a higher layer (LAYERS, bottom to top)")


def test_no_import_cycle():
    _assert_none(check_cycles(ROOT), "import cycles")


def test_no_module_takes_another_modules_private_name():
    _assert_none(check_private_names(ROOT), "private names taken from another module")


def test_imports_are_at_module_level():
    _assert_none(
        check_function_imports(ROOT),
        "imports inside a function (the package's own belong at the top; a third-party or "
        "standard-library one stays only with a comment on its line saying why, e.g. "
        "`import matplotlib  # optional: only the plot needs it`)",
    )


# --- The checks fail when they should: small fake packages ----------------------------------

# A correctly layered package, one module or more per layer: relative imports, a package
# import, an import under TYPE_CHECKING, a function-level optional dependency with its
# comment, a module using its own private names, and a parameter shadowing a module name.
CLEAN_TREE = {
    "__init__.py": '"""Fake."""\n',
    "sections/__init__.py": "",
    "sections/grpo.py": "import ml_collections\n",
    "config_lib.py": (
        "from visionr1_jax.sections import grpo\n"
        "from visionr1_jax import sections\n"
        "def _check(c):\n"
        "    return c\n"
        "def validate(c):\n"
        "    return _check(grpo.section(c))\n"
    ),
    "data/__init__.py": "from visionr1_jax.data.pipeline import make\n",
    "data/pipeline.py": "import numpy as np\nfrom .. import host\ndef make():\n    pass\n",
    "data/builders/__init__.py": "",
    "data/builders/shapes.py": "from ...data import pipeline\nfrom .. import make\n",
    "data/tfds_cli.py": "from visionr1_jax import train\nimport visionr1_jax.data.builders\n",
    "host.py": "import os\n",
    "grpo.py": "import jax\nfrom visionr1_jax.data import pipeline\n",
    "rewards/__init__.py": "from .api import score\n",
    "rewards/api.py": "from . import matching\ndef score():\n    pass\n",
    "rewards/matching.py": "import jax.numpy as jnp\n",
    "rewards/demo.py": "from visionr1_jax import experiment\n",
    "models/__init__.py": "",
    "models/qwen_vl.py": "from visionr1_jax import sharding\ndef _attention(q):\n    return q\n",
    "sharding.py": "",
    "state.py": (
        "from typing import TYPE_CHECKING\n"
        "from visionr1_jax.models import qwen_vl\n"
        "if TYPE_CHECKING:\n"
        "    from visionr1_jax import checkpoint\n"
    ),
    "checkpoint.py": "import orbax.checkpoint\n",
    "step.py": (
        "from visionr1_jax import grpo, state\n"
        "def _helper():\n"
        "    pass\n"
        "def update(s):\n"
        "    _helper()\n"
        "    return s\n"
    ),
    "train.py": (
        "from visionr1_jax import state, step\n"
        "import visionr1_jax.rewards as rw\n"
        "def loop(state):\n"  # a parameter named like the module: its `_replace` is no offence
        "    return state._replace(step=1), rw.score()\n"
        "def plot():\n"
        "    import matplotlib  # optional: only the plot needs it\n"
    ),
    "experiment.py": "from visionr1_jax import train\n",
    "main.py": "from visionr1_jax import train, experiment\n",
    "tools/__init__.py": "",
    "tools/aot.py": "from ..models import qwen_vl\nfrom visionr1_jax import main\n",
}

CHECKS = {
    "placement": check_placement,
    "layers": check_layers,
    "cycles": check_cycles,
    "private": check_private_names,
    "function_imports": check_function_imports,
}


def _write_tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def _run_checks(root: pathlib.Path) -> dict[str, list[str]]:
    return {name: check(root) for name, check in CHECKS.items()}


def test_a_correctly_layered_fake_package_passes(tmp_path):
    root = _write_tree(tmp_path, CLEAN_TREE)
    assert _run_checks(root) == {name: [] for name in CHECKS}
    modules = read_package(root)
    # placed by the most specific pattern: the CLI leaves its package's layer
    assert [
        LAYERS[layer_of(n)][0] for n in ("visionr1_jax.data", "visionr1_jax.data.tfds_cli")
    ] == [
        "ground",
        "entry",
    ]
    # `from pkg import x`: the module pkg.x when there is one, else pkg itself
    targets = [i.targets for i in modules["visionr1_jax.data.builders.shapes"].imports]
    assert targets == [("visionr1_jax.data.pipeline",), ("visionr1_jax.data",)]
    assert modules["visionr1_jax.data.tfds_cli"].imports[1].targets == (
        "visionr1_jax.data.builders",
    )
    assert import_graph(root)["visionr1_jax.state"] == {
        "visionr1_jax.models.qwen_vl": f"{PACKAGE}/state.py:2",
        "visionr1_jax.checkpoint": f"{PACKAGE}/state.py:4",
    }


# Each plant: files added to or replacing CLEAN_TREE's, and {check: the substrings its
# offences hold, one per expected offence}; every other check must stay clean.
PLANTS = {
    "ground_imports_a_stage_in_a_function": (
        {"config_lib.py": "def validate(c):\n    from visionr1_jax import step\n    return c\n"},
        {
            "layers": [
                "config_lib.py:2: visionr1_jax.config_lib (ground) imports visionr1_jax.step "
                "(stages)"
            ],
            "function_imports": [
                "config_lib.py:2: `from visionr1_jax import step` inside validate"
            ],
        },
    ),
    "kernel_imports_state_relatively_and_a_stage_under_type_checking": (
        {
            "models/qwen_vl.py": (
                "from typing import TYPE_CHECKING\n"
                "from .. import state\n"
                "if TYPE_CHECKING:\n"
                "    from visionr1_jax.step import update\n"
            )
        },
        {
            "layers": [
                "qwen_vl.py:2: visionr1_jax.models.qwen_vl (kernels) imports visionr1_jax.state",
                "qwen_vl.py:4: visionr1_jax.models.qwen_vl (kernels) imports visionr1_jax.step",
            ],
            "cycles": [
                "import cycle visionr1_jax.models.qwen_vl -> visionr1_jax.state -> "
                "visionr1_jax.models.qwen_vl (each of these reaches every other: "
                "visionr1_jax.models.qwen_vl, visionr1_jax.state, visionr1_jax.step)"
            ],
        },
    ),
    "private_names_of_other_modules": (
        {
            "train.py": (
                "from visionr1_jax import step\n"
                "from visionr1_jax.models import qwen_vl as qv\n"
                "from visionr1_jax.step import _helper\n"
                "import visionr1_jax.models.qwen_vl\n"
                "def f(q):\n"
                "    return qv._attention(q), visionr1_jax.models.qwen_vl._attention(q)\n"
            )
        },
        {
            "private": [
                "train.py:3: visionr1_jax.train uses visionr1_jax.step._helper, private to "
                "visionr1_jax.step",
                "train.py:6: visionr1_jax.train uses qv._attention, private to "
                "visionr1_jax.models.qwen_vl",
                "train.py:6: visionr1_jax.train uses visionr1_jax.models.qwen_vl._attention",
            ]
        },
    ),
    "a_cycle_inside_one_layer": (
        {
            "checkpoint.py": "from visionr1_jax import metrics\n",
            "metrics.py": "from visionr1_jax import render\n",
            "render.py": "import visionr1_jax.checkpoint\n",
        },
        {
            "cycles": [
                "checkpoint.py:1, visionr1_jax/metrics.py:1, visionr1_jax/render.py:1: import "
                "cycle visionr1_jax.checkpoint -> visionr1_jax.metrics -> visionr1_jax.render "
                "-> visionr1_jax.checkpoint"
            ]
        },
    ),
    "function_level_imports": (
        {
            "train.py": (
                "def loop():\n"
                "    from visionr1_jax import step\n"
                "    import matplotlib\n"
                "    import json  # noqa: PLC0415\n"
                "    import optax  # optional: fine\n"
            )
        },
        {
            "function_imports": [
                "train.py:2: `from visionr1_jax import step` inside loop: a package import,",
                "train.py:3: `import matplotlib` inside loop: a third-party import with no",
                "train.py:4: `import json` inside loop: a standard-library import with no",
            ]
        },
    ),
    "an_unplaced_module": (
        {"newthing.py": "", "sections/deep/__init__.py": ""},
        {"placement": ["visionr1_jax/newthing.py: visionr1_jax.newthing is in no layer"]},
    ),
}


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_planted_violation_is_caught(tmp_path, plant):
    files, expected = PLANTS[plant]
    found = _run_checks(_write_tree(tmp_path, {**CLEAN_TREE, **files}))
    for name, offences in found.items():
        wanted = expected.get(name, [])
        assert len(offences) == len(wanted), f"{name}: {offences}"
        for text in wanted:
            assert sum(text in o for o in offences) == 1, f"{name}: {text!r} in {offences}"


def test_a_module_in_two_layers_is_reported(tmp_path):
    root = _write_tree(tmp_path, CLEAN_TREE)
    layers = (("ground", (*LAYERS[0][1], "visionr1_jax.grpo")), *LAYERS[1:])
    assert check_placement(root, layers) == [
        "visionr1_jax/grpo.py: visionr1_jax.grpo is in 2 layers (ground, kernels)"
    ]
