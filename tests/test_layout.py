"""The package's shape: no import cycle between lorakit's modules, imports only point down the layers, and no
module or function past the size a reader holds at once. Module-level imports (read with ast, nothing is
imported) must point down; imports inside functions (kept lazy for start-up time) may not add new upward ones."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lorakit"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60

# Layers, bottom first: a module may import its own layer and the ones below. The longest matching prefix wins.
LAYERS = [
    ("base", ("lorakit", "lorakit.errors", "lorakit.logs", "lorakit.threads", "lorakit.fileio", "lorakit.outputs",
              "lorakit.resources", "lorakit.config", "lorakit.options", "lorakit.blocks", "lorakit.rng",
              "lorakit.hashing")),
    ("models", ("lorakit.models", "lorakit.tiny_models", "lorakit.sized_models", "lorakit.conditioning",
                "lorakit.diffusion", "lorakit.dtypes", "lorakit.precision")),
    ("adapters", ("lorakit.adapters", "lorakit.single_file")),
    ("data", ("lorakit.data",)),
    ("methods", ("lorakit.training", "lorakit.fusion", "lorakit.sampling", "lorakit.testing", "lorakit.memory")),
    ("eval", ("lorakit.eval",)),
    ("toyworld", ("lorakit.toyworld",)),
    ("commands", ("lorakit.commands", "lorakit.cli")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _module_level(body):
    """Statements run at import: the module body and the bodies of its if/try blocks, except TYPE_CHECKING."""
    for node in body:
        if isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            yield from _module_level(node.body)
            for handler in node.handlers:
                yield from _module_level(handler.body)
            yield from _module_level(node.orelse)
        else:
            yield node


def _function_level(tree):
    """Import statements inside functions (run when the function is called, not at import)."""
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from (n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))


def _imports(name: str, path: Path, modules: dict, lazy: bool = False, where=None) -> set[str]:
    """lorakit modules ``name`` imports at module level (``lazy``: anywhere, inside functions too; ``where``: the
    statements to read, e.g. :func:`_function_level`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    nodes = where(tree) if where else (ast.walk(tree) if lazy else _module_level(tree.body))
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source)
    return {m for m in found if m in modules and m != name}


def _graph(lazy: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, lazy) for name, path in modules.items()}


def _layer(name: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or (prefix != "lorakit" and name.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank)
    assert best is not None, f"{name} is in no layer of tests/test_layout.py LAYERS; add it where it belongs"
    return best[1]


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_point_down_the_layers():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
              for m, deps in sorted(_graph().items()) for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


def test_no_new_lazy_import_points_up():
    upward = [f"{m} imports {d} inside a function" for m, deps in sorted(_graph(lazy=True).items())
              for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)


# Imports of lorakit's own modules inside functions, outside lorakit/commands/ (the command line imports its layers
# inside ``run`` so that ``lorakit --help`` stays fast). Each is lazy for the reason its comment gives: the
# importing module is on ``lorakit --help``'s import path and the imported one loads torch, or a cycle.
LAZY_IMPORT_ALLOWLIST = {
    ("lorakit.outputs", "lorakit.fileio"),  # fileio imports outputs (clean_stale)
    *(("lorakit.eval.metrics", m) for m in ("lorakit.eval.clipscore", "lorakit.eval.judge", "lorakit.eval.report",
                                            "lorakit.eval.retention", "lorakit.adapters.io", "lorakit.models")),
    ("lorakit.eval.registry", "lorakit.eval.report"),
    ("lorakit.toyworld.metrics", "lorakit.eval.report"),
    ("lorakit.toyworld.metrics", "lorakit.toyworld.oracle"),
}


def test_lorakit_modules_are_imported_at_module_level():
    """The dependency graph is what the module headers say: a lazy import of lorakit's own modules needs a
    measured reason and an entry above."""
    modules = _modules()
    lazy = sorted(f"{name} imports {dep} inside a function" for name, path in modules.items()
                  if not name.startswith("lorakit.commands.")
                  for dep in _imports(name, path, modules, where=_function_level)
                  if (name, dep) not in LAZY_IMPORT_ALLOWLIST)
    assert not lazy, "import these at module level (or give the measured reason in LAZY_IMPORT_ALLOWLIST):\n" + \
        "\n".join(lazy)
    stale = sorted(pair for pair in LAZY_IMPORT_ALLOWLIST
                   if pair[1] not in _imports(pair[0], modules[pair[0]], modules, where=_function_level))
    assert not stale, f"LAZY_IMPORT_ALLOWLIST entries no longer lazy; remove them: {stale}"


def test_modules_and_functions_are_short():
    too_long = []
    for path in _modules().values():
        rel = path.relative_to(ROOT.parent).as_posix()
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, f"over {MAX_MODULE_LINES} lines per module / {MAX_FUNCTION_LINES} per function:\n" + \
        "\n".join(too_long)


def test_the_checks_see_what_they_check():
    graph = _graph()
    assert "lorakit.adapters.io" in graph["lorakit.adapters.export"]  # from-imports of modules are edges
    assert _layer("lorakit.sampling.composer") > _layer("lorakit.adapters.io") > _layer("lorakit.config")
    assert "lorakit.sampling.composer" in graph["lorakit.sampling.jobs"]
    assert "lorakit.eval.clipscore" not in graph["lorakit.eval.metrics"]  # imported inside a function only
    assert "lorakit.eval.clipscore" in _graph(lazy=True)["lorakit.eval.metrics"]


# Import name -> distribution name, where they differ.
_DISTRIBUTIONS = {"PIL": "pillow", "yaml": "pyyaml"}


def _declared() -> set[str]:
    import re
    import tomllib

    project = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    return {re.split(r"[<>=!~\[ ;]", s, maxsplit=1)[0].lower() for s in specs}


def test_every_third_party_import_is_declared():
    """What lorakit and the train_*.py scripts import is in pyproject.toml, not there by chance through another
    package's dependencies."""
    import sys

    files = list(ROOT.rglob("*.py")) + list(ROOT.parent.glob("train_*.py"))
    imported = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "lorakit"}
    assert "torch" in third_party and "yaml" in third_party  # the check sees what it checks
    undeclared = sorted(m for m in third_party if _DISTRIBUTIONS.get(m, m).lower() not in _declared())
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_tool_and_script_functions_are_short():
    repo = ROOT.parent
    too_long = []
    for path in sorted(list((repo / "tools").glob("*.py")) + list(repo.glob("train_*.py"))):
        rel = path.relative_to(repo).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.name}: {lines} lines")
    assert not too_long, f"over {MAX_FUNCTION_LINES} lines per function:\n" + "\n".join(too_long)
