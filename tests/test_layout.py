"""The house rules of the source tree, checked on the AST (lazy imports inside functions included):
no import circles, each room imports only what its `__init__` allows, only `training/distributed/`
(and the run / bench drivers) imports `ray.train` or `deepspeed`, modules stay readable in size, and
every room says what it holds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "training", "tuning", "fixtures", "cluster", "shapes")
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def imports_of(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in a file, lazy ones included; `from a import b` names `a.b` when `b`
    is a module of the project."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno))
    return found


def _violations(source_prefix: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for name, path in MODULES.items():
        if not (name == source_prefix or name.startswith(source_prefix + ".")) or name in allowed:
            continue
        for target, line in imports_of(path):
            if any(target == f or target.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return bad


def test_no_import_circles():
    graph = {
        name: {t for t, _ in imports_of(path) if t in MODULES and t != name} for name, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name)):
            pytest.fail("import circle: " + " -> ".join(cycle))


def test_only_the_distributed_room_imports_ray_train_and_deepspeed():
    drivers = ("training.run", "training.bench")
    bad = [
        v
        for v in _violations("training", ("ray.train", "deepspeed"), drivers)
        if not v.startswith("training/distributed/")
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "room,forbidden,allowed",
    [
        (
            "pipeline",
            ("training", "tuning", "fixtures", "shapes"),
            ("pipeline.synth", "pipeline.zoo", "pipeline.bench"),
        ),
        ("training", ("tuning", "fixtures", "shapes"), ("training.demo", "training.bench")),
        ("shapes", ("tuning", "fixtures"), ("shapes.build",)),
        ("tuning", ("fixtures",), ("tuning.bench",)),
        ("training.model", ("training.diffusion", "training.distributed", "training.sampling", "ray"), ()),
        (
            "training.diffusion",
            ("training.distributed", "training.sampling", "training.evaluation", "ray"),
            (),
        ),
        ("training.sampling", ("training.distributed", "ray"), ()),
        ("training.evaluation", ("training.distributed", "training.sampling", "ray"), ()),
    ],
)
def test_rooms_import_only_what_they_may(room, forbidden, allowed):
    bad = _violations(room, forbidden, allowed)
    assert not bad, "\n".join(bad)


def test_modules_stay_readable():
    long = {
        str(p.relative_to(ROOT)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_every_room_says_what_it_holds():
    rooms = [p for p in MODULES.values() if p.name == "__init__.py" and p.parent.name != "cluster"]
    assert {p.parent.name for p in rooms} >= {"model", "diffusion", "distributed", "sampling", "evaluation"}
    undocumented = [
        str(p.relative_to(ROOT)) for p in rooms if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not undocumented, undocumented


def test_the_checker_sees_lazy_imports(tmp_path):
    """The rules above would pass vacuously if lazy imports went unseen."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from training.distributed import engine\n    import deepspeed\n")
    assert [t for t, _ in imports_of(f)] == ["training.distributed.engine", "deepspeed"]
