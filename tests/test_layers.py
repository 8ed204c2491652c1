"""The layout's one rule (docs/architecture.md, "Layers"): every import points down, and no module uses another
module's private names. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module may import modules of its own layer or of lower layers, never of a higher one. Within a
# layer, packages must not import each other in a circle (checked below).
LAYERS = [
    ["rlhf_ablate.errors", "rlhf_ablate.files", "rlhf_ablate.runtime", "rlhf_ablate.hub"],
    ["rlhf_ablate.data", "rlhf_ablate.metrics"],
    ["rlhf_ablate.config"],
    ["rlhf_ablate.models"],
    ["rlhf_ablate.ppo"],
    ["rlhf_ablate.stages"],
    ["rlhf_ablate.run"],
    ["analysis"],
    ["rlhf_ablate.launch", "rlhf_ablate.api"],
    ["rlhf_ablate.cli", "rlhf_ablate.__main__", "analysis.cli", "analysis.__main__", "rlhf_ablate"],
]


def _layer_of(module: str) -> int | None:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    return rank


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("rlhf_ablate", "analysis"):
        for f in (ROOT / top).rglob("*.py"):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], node.lineno) for a in node.names)
    return found


def _top_level_names(path: Path) -> set[str]:
    """Names a module defines or imports at its top level (functions, classes, assignments, imports)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                    names.update((a.asname or a.name).split(".")[0] for a in sub.names)
                elif isinstance(sub, ast.Assign):
                    names.update(n.id for t in sub.targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _own(mod: str) -> bool:
    return mod.split(".")[0] in ("rlhf_ablate", "analysis")


def test_every_module_has_a_layer():
    missing = [m for m in _modules() if _layer_of(m) is None]
    assert not missing, f"modules outside every layer of docs/architecture.md: {missing}"


def test_every_own_import_resolves():
    # Lazy imports inside functions are only executed on some paths; check them all statically.
    mods = _modules()
    broken = []
    for name, path in mods.items():
        for mod, names, line in _imports(name, path):
            if not _own(mod):
                continue
            if mod not in mods:
                broken.append(f"{path.relative_to(ROOT)}:{line} imports missing module {mod}")
                continue
            defined = _top_level_names(mods[mod])
            for n in names:
                if f"{mod}.{n}" not in mods and n != "*" and n not in defined:
                    broken.append(f"{path.relative_to(ROOT)}:{line} imports {n} from {mod}, which has no such name")
    assert not broken, "imports that do not resolve:\n" + "\n".join(broken)


def test_imports_point_down():
    mods = _modules()
    upward = []
    for name, path in mods.items():
        me = _layer_of(name)
        for mod, names, line in _imports(name, path):
            submodules = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods]
            for t in submodules or [mod]:
                if _own(t) and _layer_of(t) is not None and _layer_of(t) > me:
                    upward.append(f"{path.relative_to(ROOT)}:{line} imports {t} (layer {_layer_of(t)} > {me})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_private_names_across_modules():
    mods = _modules()
    used = []
    for name, path in mods.items():
        for mod, names, line in _imports(name, path):
            if not _own(mod) or mod == name:
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    # a package's own submodules share its private helpers; other rooms must not
                    same_package = mod.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]
                    if not same_package:
                        used.append(f"{path.relative_to(ROOT)}:{line} uses {mod}.{n}")
    assert not used, "private names used across packages:\n" + "\n".join(used)


def test_no_import_circles_between_packages():
    mods = _modules()

    def package(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2]) if parts[0] == "rlhf_ablate" and len(parts) > 1 else parts[0]

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        for mod, names, _ in _imports(name, path):
            for t in [mod] + [f"{mod}.{n}" for n in names]:
                if t in mods and package(t) != package(name):
                    graph.setdefault(package(name), set()).add(package(t))
    seen: dict[str, int] = {}
    cycles = []

    def visit(u: str, stack: list[str]) -> None:
        seen[u] = 1
        for v in graph.get(u, ()):
            if seen.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in seen:
                visit(v, stack + [v])
        seen[u] = 2

    for u in list(graph):
        if u not in seen:
            visit(u, [u])
    # the top-level package's __init__ may re-export from anywhere (the notebook API); it is the top layer
    cycles = [c for c in cycles if not c.startswith("rlhf_ablate ->") and "-> rlhf_ablate ->" not in c]
    assert not cycles, "import circles between packages:\n" + "\n".join(cycles)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    # The rule above must be able to fail: a stage importing the launcher is reported.
    fake = tmp_path / "rlhf_ablate" / "stages"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..launch import tune\n")
    found = _imports("rlhf_ablate.stages.bad", fake / "bad.py")
    assert found[0][0] == "rlhf_ablate.launch"
    assert _layer_of(found[0][0]) > _layer_of("rlhf_ablate.stages.bad")


def test_no_module_over_450_lines_without_a_reason():
    long = []
    for path in _modules().values():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 450 and "one coherent job" not in text[:3000]:
            long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
    assert not long, "modules over 450 lines without saying why they are one coherent job:\n" + "\n".join(long)
