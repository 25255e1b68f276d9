"""The layout shows the loop: imports go only downward, never sideways between stages, and never in a cycle.

Layers, lowest first (a module may import its own package and any lower layer):

    screentone            the screentone renderers, a library of their own
    pipelines.core        pure, Ray-free helpers and formats
    model                 one architecture per file
    pipelines.runtime     Ray start-up, the unit distributor, preconditions
    stages and users      pipelines.{ingest,retrieval,screentone,shards,sample_corpus}, inference, evaluation, training
    the runner            pipelines.runner, pipelines.report
    jobs                  command lines only; nothing imports them

and a stage's ``stage`` module (its driver) is imported only by ``jobs`` and the runner.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LAYERS: tuple[tuple[str, ...], ...] = (
    ("screentone",),
    ("pipelines.core",),
    ("model",),
    ("pipelines.runtime",),
    (
        "pipelines.ingest",
        "pipelines.retrieval",
        "pipelines.screentone",
        "pipelines.shards",
        "pipelines.sample_corpus",
        "inference",
        "evaluation",
        "training",
    ),
    ("pipelines",),  # the runner and the report: pipelines' own top-level modules
    ("jobs",),
)
STAGES = ("pipelines.ingest", "pipelines.retrieval", "pipelines.screentone", "pipelines.shards")
DRIVER_USERS = ("jobs", "pipelines.runner")
ROOTS = ("screentone", "pipelines", "model", "inference", "evaluation", "training", "jobs")


def _package_of(module: str) -> str:
    """The most specific entry of LAYERS that contains `module`."""
    best = ""
    for layer in LAYERS:
        for package in layer:
            if (module == package or module.startswith(package + ".")) and len(package) > len(best):
                best = package
    if not best:
        raise AssertionError(f"module {module} is in no layer of tests/test_imports.py")
    return best


def _rank(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def project_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for top in ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file (top level or inside functions), resolved to modules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        source = _package_of(module)
        for target in sorted(targets):
            destination = _package_of(target)
            if target.startswith(module + ".") and destination == source:
                continue  # a package's __init__ naming its own modules
            if destination == source:
                continue
            if _rank(destination) > _rank(source):
                problems.append(f"{module} -> {target}: upward import ({source} is below {destination})")
            elif _rank(destination) == _rank(source):
                problems.append(f"{module} -> {target}: sideways import between {source} and {destination}")
        for stage in STAGES:
            driver = f"{stage}.stage"
            if driver in targets and not module.startswith(DRIVER_USERS):
                problems.append(f"{module} -> {driver}: only jobs/ and pipelines.runner import a stage's driver")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_go_only_downward(repo_root: Path) -> None:
    problems = layer_violations(import_graph(repo_root))
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_no_import_cycles(repo_root: Path) -> None:
    graph = import_graph(repo_root)
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(_package_of(module), set()).update(_package_of(t) for t in targets)
    package_cycles = cycles({name: targets - {name} for name, targets in packages.items()})
    assert not package_cycles, "package cycles:\n" + "\n".join(" -> ".join(c) for c in package_cycles)


def test_nothing_imports_jobs(repo_root: Path) -> None:
    graph = import_graph(repo_root)
    users = sorted(
        f"{m} -> {t}" for m, ts in graph.items() if not m.startswith("jobs") for t in ts if t.startswith("jobs")
    )
    assert not users, "modules outside jobs/ import it:\n" + "\n".join(users)


@pytest.mark.parametrize(
    ("source", "target", "why"),
    [
        ("pipelines.retrieval.stage", "pipelines.ingest.stage", "sideways"),
        ("pipelines.core.storage", "pipelines.runtime.ray", "upward"),
        ("training.train_icp", "jobs.common", "upward"),
        ("inference.colorize", "pipelines.retrieval.stage", "sideways"),
    ],
)
def test_the_check_names_a_bad_import(source: str, target: str, why: str) -> None:
    problems = layer_violations({source: {target}, target: set()})
    assert problems and problems[0].startswith(f"{source} -> {target}") and why in problems[0]


def test_the_check_finds_a_cycle() -> None:
    assert cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]
