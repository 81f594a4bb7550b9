"""The package's import structure: no import cycles and no import from a higher layer.

Every .py file of the installed package is parsed with `ast` (all imports: module level, inside functions, under
TYPE_CHECKING). File paths become module names through pyproject.toml's package-dir mapping (read with tomllib, so
kernels/ is vllm_lite.kernels, compile/ is vllm_lite.compile, ...); relative imports are resolved. Importing
`a.b.c` also runs the __init__ of the packages `a.b` it passes through: those implicit edges count too (except the
root package and the importer's own ancestors, which are already initialising when it runs).

Layers, top to bottom; a module may import its own unit (package, or one of the modules listed for a unit), a unit
of its layer that LAYER_EDGES allows, or any lower layer. Base modules (LAYERS' last entry) are listed one by one:
a new top-level module fails `test_every_module_has_a_layer` until it is placed.
"""
from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vllm_lite"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("entrypoints", ("vllm_lite.entrypoints", "vllm_lite.benchmarks", "vllm_lite.evals", "vllm_lite",
                     "vllm_lite.__main__",
                     "vllm_lite.spec_decode.train")),  # the draft trainer drives the engine (it generates its data)
    ("engine", ("vllm_lite.engine",)),
    ("core/executor", ("vllm_lite.core", "vllm_lite.executor", "vllm_lite.structured_output")),
    ("worker", ("vllm_lite.worker",)),
    ("spec_decode/sample/models/model_loader", ("vllm_lite.spec_decode", "vllm_lite.model_loader", "vllm_lite.models",
                                                "vllm_lite.sample")),
    ("layers/attention", ("vllm_lite.layers", "vllm_lite.attention")),
    ("distributed", ("vllm_lite.distributed",)),  # tensor-parallel group + collective ops, used by the layers
    ("compile", ("vllm_lite.compile",)),
    ("kernels", ("vllm_lite.kernels",)),
    ("base", ("vllm_lite.protocol", "vllm_lite.config", "vllm_lite.envs", "vllm_lite.sampling_params",
              "vllm_lite.request", "vllm_lite.outputs", "vllm_lite.logging_utils", "vllm_lite.gc_utils",
              "vllm_lite.tokenizer", "vllm_lite.detokenizer", "vllm_lite.inputs", "vllm_lite.proc_utils",
              "vllm_lite.shared_masks")),
]
# Layers whose units may import each other freely (nothing above the top one; base modules are peers).
OPEN_LAYERS = frozenset({"entrypoints", "base"})
# Allowed imports between different units of one layer (importer unit, imported unit).
LAYER_EDGES = frozenset({("vllm_lite.model_loader", "vllm_lite.models"), ("vllm_lite.spec_decode", "vllm_lite.sample"),
                         # in-worker drafters load and run models (a draft model, EAGLE heads)
                         ("vllm_lite.spec_decode", "vllm_lite.model_loader"),
                         ("vllm_lite.spec_decode", "vllm_lite.models")})
# Rules that hold whatever the layer order says: (importer prefix, imported prefixes it may NOT import), and
# (importer layer, the only layers it may import).
FORBIDDEN = (("vllm_lite.core", ("vllm_lite.engine",)), ("vllm_lite.worker", ("vllm_lite.engine",)))
ONLY = {"kernels": {"kernels", "base"}, "base": {"base"}}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    path: str  # file of the importer, relative to the repository root
    line: int
    text: str  # the import statement
    implicit: bool = False  # the __init__ of a package the import passes through

    def __str__(self) -> str:
        via = f" (runs package {self.target}'s __init__)" if self.implicit else ""
        return f"{self.path}:{self.line}: `{self.text}`{via}"


# ---- collection ---------------------------------------------------------------------------------------------------
def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    with open(root / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    return {pkg: root / d for pkg, d in setuptools["package-dir"].items()}


def installed_packages(root: Path = ROOT) -> set[str]:
    with open(root / "pyproject.toml", "rb") as f:
        return set(tomllib.load(f)["tool"]["setuptools"]["packages"])


def module_files(dirs: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is_package) for every .py file under the mapped package directories."""
    modules: dict[str, tuple[Path, bool]] = {}
    for pkg, d in dirs.items():
        for path in sorted(d.rglob("*.py")):
            rel = path.relative_to(d).with_suffix("").parts
            if "__pycache__" in rel:
                continue
            is_pkg = rel[-1] == "__init__"
            name = ".".join((pkg, *(rel[:-1] if is_pkg else rel)))
            modules[name] = (path, is_pkg)
    return modules


def _statement(node: ast.Import | ast.ImportFrom) -> str:
    names = ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in node.names)
    if isinstance(node, ast.Import):
        return f"import {names}"
    return f"from {'.' * node.level}{node.module or ''} import {names}"


def _internal(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


def imports_of(module: str, is_package: bool, source: str, path: str, modules: set[str],
               root: str = PACKAGE) -> list[Import]:
    """Every import of `root`'s modules in `source` (the file of `module`), explicit and implicit."""
    found: list[Import] = []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        text = _statement(node)
        for target in dict.fromkeys(targets):
            if not _internal(target, root):
                continue
            found.append(Import(module, target, path, node.lineno, text))
            parts = target.split(".")
            for i in range(2, len(parts)):  # packages passed through, below the root
                parent = ".".join(parts[:i])
                if parent != module and not module.startswith(parent + "."):
                    found.append(Import(module, parent, path, node.lineno, text, implicit=True))
    return found


def import_graph(root: Path = ROOT) -> tuple[dict[str, list[Import]], set[str]]:
    files = module_files(package_dirs(root))
    modules = set(files)
    graph: dict[str, list[Import]] = {}
    for name, (path, is_pkg) in files.items():
        graph[name] = imports_of(name, is_pkg, path.read_text(), str(path.relative_to(root)), modules)
    return graph, modules


# ---- checks -------------------------------------------------------------------------------------------------------
def unit_of(module: str, layers=LAYERS) -> tuple[int, str, str] | None:
    """(layer index from the top, layer name, unit) of a module, or None if no layer holds it."""
    best = None
    for i, (layer, units) in enumerate(layers):
        for unit in units:
            match = module == unit or (unit != PACKAGE and module.startswith(unit + "."))
            if match and (best is None or len(unit) > len(best[2])):
                best = (i, layer, unit)
    return best


def unknown_imports(graph: dict[str, list[Import]], modules: set[str]) -> list[str]:
    return [f"{imp}: no module {imp.target} in the package"
            for imps in graph.values() for imp in imps if imp.target not in modules]


def unplaced_modules(modules: set[str], layers=LAYERS) -> list[str]:
    return sorted(m for m in modules if unit_of(m, layers) is None)


def layer_violations(graph: dict[str, list[Import]], layers=LAYERS, open_layers=OPEN_LAYERS,
                     layer_edges=LAYER_EDGES, forbidden=FORBIDDEN, only=ONLY) -> list[str]:
    problems = []
    for importer, imps in sorted(graph.items()):
        src = unit_of(importer, layers)
        reported: set[int] = set()  # lines already reported: their implicit package edges add nothing
        for imp in sorted(imps, key=lambda i: i.implicit):
            if imp.implicit and imp.line in reported:
                continue
            dst = unit_of(imp.target, layers)
            if src is None or dst is None:
                continue  # reported by unplaced_modules / unknown_imports
            why = None
            if dst[0] < src[0]:
                why = f"layer {src[1]} imports the higher layer {dst[1]}"
            elif dst[0] == src[0] and dst[2] != src[2] and src[1] not in open_layers \
                    and (src[2], dst[2]) not in layer_edges:
                why = f"{src[2]} imports {dst[2]}, another unit of layer {src[1]} (not in LAYER_EDGES)"
            elif src[1] in only and dst[1] not in only[src[1]]:
                why = f"layer {src[1]} may import only {sorted(only[src[1]])}, not {dst[1]}"
            for prefix, banned in forbidden:
                if _internal(importer, prefix) and any(_internal(imp.target, b) for b in banned):
                    why = f"{prefix} must not import {', '.join(banned)}"
            if why:
                reported.add(imp.line)
                problems.append(f"{imp}: {importer} -> {imp.target}: {why}")
    return problems


def find_cycles(graph: dict[str, list[Import]]) -> list[list[Import]]:
    """One cycle (as its import edges) per strongly connected component with more than one module."""
    adj: dict[str, dict[str, Import]] = {}
    for importer, imps in graph.items():
        for imp in imps:
            if imp.target != importer:
                adj.setdefault(importer, {}).setdefault(imp.target, imp)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = [0]

    def strongconnect(v: str) -> None:  # Tarjan's algorithm (recursive: the package has ~100 modules)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in adj.get(v, {}):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(set(adj) | {t for succ in adj.values() for t in succ}):
        if v not in index:
            strongconnect(v)

    cycles = []
    for comp in sccs:
        members = set(comp)
        start = comp[0]
        # Shortest path start -> ... -> start inside the component (breadth first).
        prev: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(adj.get(v, {})):
                    if w == start:
                        end = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        prev[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [end]
        while path[-1] != start:
            path.append(prev[path[-1]])
        path.reverse()
        cycles.append([adj[a][b] for a, b in zip(path, path[1:] + [start])])
    return cycles


def format_cycle(cycle: list[Import]) -> str:
    return " -> ".join([cycle[0].importer] + [e.target for e in cycle]) + "\n" + \
        "\n".join(f"    {e}" for e in cycle)


# ---- the package --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    unplaced = unplaced_modules(graph[1])
    assert not unplaced, ("modules in no layer (place them in LAYERS of tests/test_import_structure.py): "
                          + ", ".join(unplaced))


def test_imports_name_existing_modules(graph):
    problems = unknown_imports(*graph)
    assert not problems, "imports of modules that do not exist:\n" + "\n".join(problems)


def test_no_import_cycles(graph):
    cycles = find_cycles(graph[0])
    assert not cycles, "import cycles:\n" + "\n".join(format_cycle(c) for c in cycles)


def test_no_upward_imports(graph):
    problems = layer_violations(graph[0])
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_every_package_is_installed(graph):
    """Each package directory under a mapped folder is listed in pyproject's `packages` (else the wheel lacks it)."""
    _, modules = graph
    files = module_files(package_dirs())
    packages = {m for m in modules if files[m][1]}
    missing = sorted(packages - installed_packages())
    assert not missing, f"packages missing from pyproject.toml [tool.setuptools] packages: {', '.join(missing)}"


# ---- the checker itself, on synthetic sources and graphs ----------------------------------------------------------
SYNTHETIC = {
    "vllm_lite.kernels.fast": (False, """
from __future__ import annotations
from typing import TYPE_CHECKING
import torch
from vllm_lite.config import KernelConfig
if TYPE_CHECKING:
    from vllm_lite.attention.backend import AttentionSpec
def f():
    from ..sample import sampler
    import vllm_lite.layers.norm as n
"""),
    "vllm_lite.sample.sampler": (False, "from .topk import g\nfrom . import topk\n"
                                        "from vllm_lite.kernels import fast\n"),
    "vllm_lite.sample.topk": (False, "def g():\n    from vllm_lite.kernels.fast import f\n"),
    "vllm_lite.sample": (True, "from .sampler import Sampler\n"),
    "vllm_lite.config": (False, "import os\n"),
    "vllm_lite.attention.backend": (False, ""),
    "vllm_lite.attention": (True, ""),
    "vllm_lite.layers.norm": (False, ""),
    "vllm_lite.layers": (True, ""),
    "vllm_lite.kernels": (True, ""),
    "vllm_lite": (True, ""),
}


def _synthetic_graph() -> dict[str, list[Import]]:
    modules = set(SYNTHETIC)
    return {m: imports_of(m, is_pkg, src, m.replace(".", "/") + ".py", modules)
            for m, (is_pkg, src) in SYNTHETIC.items()}


def test_checker_collects_every_kind_of_import():
    g = _synthetic_graph()
    fast = {(i.target, i.implicit) for i in g["vllm_lite.kernels.fast"]}
    assert fast == {("vllm_lite.config", False), ("vllm_lite.attention.backend", False),  # under TYPE_CHECKING
                    ("vllm_lite.attention", True), ("vllm_lite.sample.sampler", False),  # relative, in a function
                    ("vllm_lite.sample", True), ("vllm_lite.layers.norm", False), ("vllm_lite.layers", True)}
    # Relative imports from a module and from a package; no implicit edge to the importer's own package.
    assert {(i.target, i.implicit) for i in g["vllm_lite.sample.sampler"]} == {
        ("vllm_lite.sample.topk", False), ("vllm_lite.kernels.fast", False), ("vllm_lite.kernels", True)}
    assert [i.target for i in g["vllm_lite.sample"]] == ["vllm_lite.sample.sampler"]
    line = next(i for i in g["vllm_lite.kernels.fast"] if i.target == "vllm_lite.layers.norm")
    assert str(line) == "vllm_lite/kernels/fast.py:10: `import vllm_lite.layers.norm as n`"


def test_checker_reports_cycles_with_files():
    cycles = find_cycles(_synthetic_graph())
    text = "\n".join(format_cycle(c) for c in cycles)
    assert len(cycles) == 1, text
    assert set(e.importer for e in cycles[0]) <= {"vllm_lite.kernels.fast", "vllm_lite.sample.sampler",
                                                  "vllm_lite.sample.topk", "vllm_lite.sample"}
    assert "vllm_lite/kernels/fast.py:9: `from ..sample import sampler`" in text
    acyclic = {"a": [Import("a", "b", "a.py", 1, "import b")], "b": [Import("b", "c", "b.py", 1, "import c")]}
    assert find_cycles(acyclic) == []


def test_checker_reports_upward_and_sideways_imports():
    problems = layer_violations(_synthetic_graph())
    text = "\n".join(problems)
    # kernels -> attention, sample, layers: upward; the implicit package edges say so too.
    assert "vllm_lite/kernels/fast.py:7: `from vllm_lite.attention.backend import AttentionSpec`" in text
    assert "layer kernels imports the higher layer layers/attention" in text
    assert "layer kernels imports the higher layer spec_decode/sample/models/model_loader" in text
    assert "-> vllm_lite.config:" not in text  # kernels -> base is fine
    assert not any(p.startswith("vllm_lite/sample/") for p in problems), text  # sample -> kernels is downward
    imp = lambda a, b: {a: [Import(a, b, a.replace(".", "/") + ".py", 3, f"import {b}")]}  # noqa: E731
    assert layer_violations(imp("vllm_lite.model_loader.loader", "vllm_lite.models.decoder")) == []
    assert layer_violations(imp("vllm_lite.attention.layer", "vllm_lite.layers.norm")), "sideways: not allowed"
    assert layer_violations(imp("vllm_lite.models.decoder", "vllm_lite.model_loader.loader")), "against LAYER_EDGES"
    assert "must not import vllm_lite.engine" in layer_violations(imp("vllm_lite.core.x", "vllm_lite.engine.y"))[0]
    assert layer_violations(imp("vllm_lite.config", "vllm_lite.kernels.fast"))  # base imports only base
    assert layer_violations(imp("vllm_lite.envs", "vllm_lite.config")) == []
    assert layer_violations(imp("vllm_lite", "vllm_lite.entrypoints.llm")) == []


def test_checker_reports_unplaced_and_unknown_modules():
    assert unplaced_modules({"vllm_lite.config", "vllm_lite.newthing", "vllm_lite.kernels.x"}) == ["vllm_lite.newthing"]
    assert unit_of("vllm_lite.attention.layer")[1:] == ("layers/attention", "vllm_lite.attention")
    assert unit_of("vllm_lite")[1] == "entrypoints" and unit_of("vllm_lite.configx") is None
    g = {"vllm_lite.a": [Import("vllm_lite.a", "vllm_lite.gone", "vllm_lite/a.py", 2, "import vllm_lite.gone")]}
    assert unknown_imports(g, {"vllm_lite.a"}) == [
        "vllm_lite/a.py:2: `import vllm_lite.gone`: no module vllm_lite.gone in the package"]


def test_module_names_follow_the_package_dir_mapping():
    files = module_files(package_dirs())
    assert files["vllm_lite.kernels.kv_cache"][0] == ROOT / "kernels" / "kv_cache.py"
    assert files["vllm_lite.compile"] == (ROOT / "compile" / "__init__.py", True)
    assert files["vllm_lite.attention.layer"][0] == ROOT / "vllm_lite" / "attention" / "layer.py"
