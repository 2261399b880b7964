"""The layers of `retrieval/` (retrieval/README.md), read from the source: no module imports a layer above its own,
`retrieval` never imports `indexer` or `cli`, `indexer` never imports `cli`, and no two modules import each other
round a cycle. Every import counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Bottom to top. The base layer is the modules at the top of retrieval/ (errors, typed config, paths).
LAYERS = (
    "base",
    "imaging",
    "store",
    "model",
    "ann",
    "evaluation",
    "search",
    "maintain",
    "finetune",
    "serve",
    "retrieval",  # retrieval/__init__.py: the package's public names, re-exported from the layers below
    "indexer",
    "cli",
    "clipdex",  # retrieval/_clipdex: the import package `clipdex` itself, re-exporting from everything
)
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    """`retrieval/store/manifest.py` → `clipdex.retrieval.store.manifest` (the installed name)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts = ["clipdex", *parts[2:]] if parts[:2] == ["retrieval", "_clipdex"] else ["clipdex", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer a `clipdex.…` module belongs to."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "clipdex"
    if parts[1] in ("indexer", "cli"):
        return parts[1]
    if len(parts) == 2:
        return "retrieval"
    sub = parts[2]
    if sub in RANK:
        return sub
    return "base"


def source_modules() -> dict[str, Path]:
    files = [*ROOT.glob("retrieval/**/*.py"), *ROOT.glob("indexer/**/*.py"), *ROOT.glob("cli/**/*.py")]
    return {module_name(p): p for p in sorted(files)}


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for every clipdex module `path` imports, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "clipdex"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] != "clipdex":
                continue
            for alias in node.names:  # `from clipdex.retrieval import ann` imports the module clipdex.retrieval.ann
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else base))
    return found


def violations(modules: dict[str, Path]) -> list[str]:
    known = set(modules)
    problems = []
    for module, path in modules.items():
        mine = RANK[layer_of(module)]
        for line, target in imports_of(path, module, known):
            theirs = RANK[layer_of(target)]
            if theirs > mine:
                where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
                problems.append(f"{where}:{line}: {layer_of(module)} imports {target} ({layer_of(target)}, above)")
    return problems


def cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Import cycles among modules (package __init__ files re-export their own modules and are left out)."""
    known = set(modules)
    graph = {
        m: {t for _, t in imports_of(p, m, known) if t in known and modules[t].name != "__init__.py" and t != m}
        for m, p in modules.items()
        if p.name != "__init__.py"
    }
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                found.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_every_module_has_a_layer():
    modules = source_modules()
    assert len(modules) > 40
    for module in modules:
        assert layer_of(module) in RANK, module


def test_no_module_imports_a_layer_above_its_own():
    assert violations(source_modules()) == []


def test_no_import_cycles():
    assert cycles(source_modules()) == []


@pytest.mark.parametrize(
    ("where", "line", "expect"),
    [
        ("retrieval/store/catalog.py", "from clipdex.retrieval.search.searcher import Searcher", "store imports"),
        ("retrieval/imaging/decode.py", "from clipdex.retrieval import ann", "imaging imports clipdex.retrieval.ann"),
        ("retrieval/ann/build.py", "from clipdex.indexer import sources", "ann imports clipdex.indexer"),
        ("indexer/pipeline.py", "from clipdex.cli.common import out", "indexer imports clipdex.cli.common"),
        ("retrieval/model/encoder.py", "from clipdex.retrieval import Searcher", "(retrieval, above)"),
    ],
)
def test_an_upward_import_added_on_purpose_is_caught(tmp_path, where, line, expect):
    """The check itself can fail: a copy of a module with one upward import added inside a function."""
    found = violations(_with_added(tmp_path, where, line))
    assert any(where in v and expect in v for v in found), f"the upward import in {where} was not reported"


def test_a_cycle_added_on_purpose_is_caught(tmp_path):
    # the writer takes the lock; make the lock import the writer back
    modules = _with_added(tmp_path, "retrieval/store/lock.py", "from clipdex.retrieval.store import writer")
    assert any("clipdex.retrieval.store.lock" in c for c in cycles(modules))


def _with_added(tmp_path: Path, where: str, line: str) -> dict[str, Path]:
    """The tree's modules, with `where` replaced by a copy that imports `line` inside a function."""
    copy = tmp_path / where
    copy.parent.mkdir(parents=True)
    copy.write_text((ROOT / where).read_text(encoding="utf-8") + f"\n\ndef _added():\n    {line}\n", encoding="utf-8")
    return {**source_modules(), module_name(ROOT / where): copy}
