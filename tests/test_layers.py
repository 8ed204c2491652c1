"""The layout's one rule (docs/architecture.md, "Layers"): every import points down, and no module uses another
module's private names. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOPS = ("rlhf_ablate", "analysis", "tools", "benchmarks")   # every tree the checks read

# Bottom to top, as docs/architecture.md's "Layers" table lists them. A module may import its own package and lower
# layers, never a higher one; two packages of one layer never import each other. Every module is assigned here
# explicitly: an entry names a package (and everything in it) or, for the package roots, exactly one module.
LAYERS = [
    ["rlhf_ablate.errors"],
    ["rlhf_ablate.files"],
    ["rlhf_ablate.runtime", "rlhf_ablate.hub", "rlhf_ablate.rundir"],
    ["rlhf_ablate.data", "rlhf_ablate.metrics"],
    ["rlhf_ablate.config"],
    ["rlhf_ablate.models"],
    ["rlhf_ablate.ppo"],
    ["rlhf_ablate.stages"],
    ["rlhf_ablate.run"],
    ["analysis"],
    ["rlhf_ablate.launch"],
    ["rlhf_ablate.api"],
    ["analysis.cli"],
    ["rlhf_ablate.cli"],
    ["rlhf_ablate.__main__", "analysis.__main__", "=rlhf_ablate", "=analysis"],
    ["tools", "benchmarks"],
]
# At most MAX_LONG modules of the package trees over MAX_LINES lines, none over HARD_MAX (tools/ and benchmarks/ are
# scripts: their imports are checked, their length is not).
MAX_LINES, MAX_LONG, HARD_MAX = 450, 2, 600


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _matches(module: str, entry: str) -> bool:
    if entry.startswith("="):
        return module == entry[1:]
    return module == entry or module.startswith(entry + ".")


def _entry_of(module: str) -> str | None:
    found = [(len(e), e) for names in LAYERS for e in names if _matches(module, e)]
    return max(found)[1] if found else None


def _layer_of(module: str) -> int | None:
    entry = _entry_of(module)
    return next(i for i, names in enumerate(LAYERS) if entry in names) if entry else None


def _modules() -> dict[str, Path]:
    out = {}
    for top in TOPS:
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
    return mod.split(".")[0] in TOPS


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


def _targets(name: str, mod: str, names: list[str], mods: dict) -> list[str]:
    """The modules an import statement reaches: the named submodules, else the module itself."""
    subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in mods]
    return [t for t in subs or [mod] if t in mods and t != name and not name.startswith(t + ".")]


def test_imports_point_down():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        me, mine = _layer_of(name), _entry_of(name)
        for mod, names, line in _imports(name, path):
            for t in _targets(name, mod, names, mods):
                if _layer_of(t) > me:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {t} (layer {_layer_of(t)} > {me})")
                elif _layer_of(t) == me and _entry_of(t) != mine and _entry_of(t) is not None:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {t}: {_entry_of(t)} and {mine} share a "
                               f"layer, and packages of one layer never import each other")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def _private_uses(name: str, path: Path, mods: dict) -> list[str]:
    """Private names (``_x``) of another package used in any form: ``from m import _x``, ``import m._x``, or an
    attribute ``alias._x`` of a module imported under ``alias``."""
    def package(m: str) -> str:
        return m.rsplit(".", 1)[0] if m in mods and not str(mods[m]).endswith("__init__.py") else m

    found = []
    aliases: dict[str, str] = {}
    for mod, names, line in _imports(name, path):
        for n in names:
            if f"{mod}.{n}" in mods:
                aliases[n] = f"{mod}.{n}"
        if not names:
            aliases[mod.split(".")[0]] = mod.split(".")[0]
        if not _own(mod):
            continue
        for part in mod.split(".")[1:]:
            if part.startswith("_") and not part.startswith("__"):
                found.append(f"{_rel(path)}:{line} imports private module {mod}")
        for n in names:
            if n.startswith("_") and not n.startswith("__") and package(mod) != package(name):
                found.append(f"{_rel(path)}:{line} uses {mod}.{n}")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, v = [node.attr], node.value
            while isinstance(v, ast.Attribute):
                chain.append(v.attr)
                v = v.value
            if isinstance(v, ast.Name) and v.id in aliases:
                target = ".".join([aliases[v.id], *reversed(chain[1:])])
                if _own(target) and package(target) != package(name):
                    found.append(f"{_rel(path)}:{node.lineno} uses {target}.{node.attr}")
    return found


def test_no_private_names_across_packages():
    mods = _modules()
    used = [u for name, path in mods.items() for u in _private_uses(name, path, mods)]
    assert not used, "private names used across packages:\n" + "\n".join(used)


def test_no_import_circles():
    """No circle between modules, lazy imports included, in any tree (analysis/ too)."""
    mods = _modules()
    graph = {name: {t for mod, names, _ in _imports(name, path) for t in _targets(name, mod, names, mods)}
             for name, path in mods.items()}
    seen: dict[str, int] = {}
    cycles = []

    def visit(u: str, stack: list[str]) -> None:
        seen[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if seen.get(v) == 1:
                cycles.append(" -> ".join(stack[stack.index(v):] + [v]))
            elif v not in seen:
                visit(v, stack)
        stack.pop()
        seen[u] = 2

    for u in sorted(graph):
        if u not in seen:
            visit(u, [])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    # The rule above must be able to fail: a stage importing the launcher is reported.
    fake = tmp_path / "rlhf_ablate" / "stages"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from ..launch import tune\n")
    found = _imports("rlhf_ablate.stages.bad", fake / "bad.py")
    assert found[0][0] == "rlhf_ablate.launch"
    assert _layer_of(found[0][0]) > _layer_of("rlhf_ablate.stages.bad")


def test_long_modules_are_few():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
               for m, p in _modules().items() if m.split(".")[0] in ("rlhf_ablate", "analysis")}
    long = sorted((n, f) for f, n in lengths.items() if n > MAX_LINES)
    assert len(long) <= MAX_LONG and all(n <= HARD_MAX for n, _ in long), (
        f"at most {MAX_LONG} modules over {MAX_LINES} lines and none over {HARD_MAX}: {long}")


def test_the_checks_can_fail(tmp_path):
    # An unassigned module, a same-layer import between packages and a private attribute are each reported.
    assert _layer_of("rlhf_ablate.newpackage.x") is None
    assert _layer_of("rlhf_ablate") == len(LAYERS) - 2 and _layer_of("rlhf_ablate.rundir") == 2
    bad = tmp_path / "rlhf_ablate" / "data" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("from .. import metrics\nfrom ..models import loading\nx = loading._hub_kwargs\n")
    mods = {**_modules(), "rlhf_ablate.data.bad": bad}
    targets = [t for mod, names, _ in _imports("rlhf_ablate.data.bad", bad)
               for t in _targets("rlhf_ablate.data.bad", mod, names, mods)]
    assert "rlhf_ablate.metrics" in targets and _layer_of("rlhf_ablate.metrics") == _layer_of("rlhf_ablate.data")
    assert any("_hub_kwargs" in u for u in _private_uses("rlhf_ablate.data.bad", bad, mods))


def test_the_how_to_section_names_files_that_exist():
    """docs/architecture.md, "How to add a method, a metric, a launcher or a data format": every file it names."""
    import re

    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = doc.split("## How to add a method", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`((?:rlhf_ablate|docs|tests|analysis)/[\w/.]+\.(?:py|md))", section))
    assert len(named) >= 8, named
    missing = sorted(f for f in named if not (ROOT / f).is_file())
    assert not missing, f"the how-to section names files that do not exist: {missing}"

