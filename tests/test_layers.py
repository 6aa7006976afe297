"""The package's layers import only downward, with no cycles and no function-local imports of the package.

Layers (lower rank first): the core maths (tree → problem, scaling → linalg → curvature → aic → landscapes,
dynamics) → models and data → harness and testing → studies → cli. A module may import a unit of strictly lower
rank, or its own unit; the package root imports only the core. configs/ imports only ml_collections and
configs/common.py.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "alignment_geom")

RANKS = {
    "tree": 0,
    "problem": 1, "scaling": 1,
    "linalg": 2,
    "curvature": 3,
    "aic": 4,
    "landscapes": 5, "dynamics": 5,
    "models": 10, "data": 10,
    "harness": 20, "testing": 20,
    "studies": 30,
    "cli": 40,
}
CORE_MAX = 5


def _modules(pkg_dir=PKG):
    """(dotted name, path) of every module of the package."""
    out = []
    for dirpath, _, files in os.walk(pkg_dir):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(pkg_dir))[:-3].replace(os.sep, ".")
                out.append((rel[:-len(".__init__")] if rel.endswith(".__init__") else rel, path))
    return sorted(out)


def _imports(path, package):
    """[(imported dotted module, line, function-local?)] of the package's own modules imported by a file."""
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, local):
        for child in ast.iter_child_nodes(node):
            is_local = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == package:
                        found.append((a.name, child.lineno, local))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.split(".")[0] == package:
                    for a in child.names:
                        # `from pkg.sub import name` may import the submodule pkg.sub.name: keep both spellings
                        found.append((f"{child.module}.{a.name}", child.lineno, local))
            visit(child, is_local)

    visit(tree, False)
    return found


def _unit(dotted):
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_violations(pkg_dir=PKG, ranks=RANKS):
    """Every upward or sideways import, function-local import of the package, and unknown unit."""
    package = os.path.basename(pkg_dir)
    bad = []
    for name, path in _modules(pkg_dir):
        src_unit = _unit(name)
        for target, line, local in _imports(path, package):
            where = f"{os.path.relpath(path, ROOT)}:{line}"
            if local:
                bad.append(f"{where}: function-local import of {target}")
            dst_unit = _unit(target)
            if dst_unit is None:
                bad.append(f"{where}: imports the package root")
                continue
            if src_unit is None:                         # the package root: the flat API, core only
                if ranks.get(dst_unit, 99) > CORE_MAX:
                    bad.append(f"{where}: the package root imports {target} (above the core)")
                continue
            if src_unit not in ranks:
                bad.append(f"{where}: module of unknown layer {src_unit!r}")
                continue
            if dst_unit == src_unit:
                continue
            if dst_unit not in ranks:
                bad.append(f"{where}: imports {target} of unknown layer")
            elif ranks[dst_unit] >= ranks[src_unit]:
                bad.append(f"{where}: {src_unit} (rank {ranks[src_unit]}) imports {target} "
                           f"(rank {ranks[dst_unit]}): upward or sideways")
    return bad


def import_cycles(pkg_dir=PKG):
    """Cycles in the module-level import graph between the package's modules (a list of cycles)."""
    package = os.path.basename(pkg_dir)
    mods = dict(_modules(pkg_dir))
    graph = {}
    for name, path in mods.items():
        deps = set()
        for target, _, local in _imports(path, package):
            if local:
                continue
            while target not in mods and "." in target:    # `from pkg.mod import name` -> pkg.mod
                target = target.rsplit(".", 1)[0]
            if target in mods and target != name:
                deps.add(target)
        graph[name] = deps
    cycles, state = [], {}

    def dfs(n, stack):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            # a package's __init__ importing its own submodules is the normal re-export pattern
            if m.startswith(n + "."):
                continue
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                dfs(m, stack)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n, [])
    return cycles


def test_layers_import_only_downward():
    assert layer_violations() == []


def test_no_import_cycles():
    assert import_cycles() == []


def test_every_unit_has_a_layer():
    units = {_unit(n) for n, _ in _modules()} - {None}
    assert units <= set(RANKS), units - set(RANKS)


def _plant(tmp_path, files):
    pkg = tmp_path / "alignment_geom"
    for rel, src in files.items():
        p = pkg / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(src)
    return str(pkg)


@pytest.mark.parametrize("files,needle", [
    ({"__init__.py": "", "linalg/__init__.py": "", "linalg/bad.py": "from alignment_geom import harness\n",
      "harness/__init__.py": ""}, "linalg (rank 2) imports alignment_geom.harness"),
    ({"__init__.py": "", "aic/__init__.py": "", "aic/x.py": "from alignment_geom.studies import run\n",
      "studies/__init__.py": ""}, "upward"),
    ({"__init__.py": "", "dynamics/__init__.py": "", "dynamics/x.py": "import alignment_geom.landscapes\n",
      "landscapes.py": ""}, "sideways"),
    ({"__init__.py": "", "curvature/__init__.py": "",
      "curvature/x.py": "def f():\n    from alignment_geom import tree\n    return tree\n", "tree.py": ""},
     "function-local import"),
    ({"__init__.py": "from alignment_geom import studies\n", "studies/__init__.py": ""}, "package root imports"),
])
def test_a_planted_upward_import_is_caught(tmp_path, files, needle):
    bad = layer_violations(_plant(tmp_path, files))
    assert any(needle in b for b in bad), bad


def test_a_planted_cycle_is_caught(tmp_path):
    pkg = _plant(tmp_path, {"__init__.py": "", "linalg/__init__.py": "",
                            "linalg/a.py": "from alignment_geom.linalg import b\n",
                            "linalg/b.py": "from alignment_geom.linalg.a import f\n"})
    assert import_cycles(pkg) == [["alignment_geom.linalg.a", "alignment_geom.linalg.b", "alignment_geom.linalg.a"]]


def test_configs_import_only_ml_collections_and_common():
    cdir = os.path.join(ROOT, "configs")
    for f in sorted(os.listdir(cdir)):
        if not f.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(cdir, f)).read())
        mods = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods.add(node.module if node.module != "configs" else "configs." + node.names[0].name)
        assert mods <= {"ml_collections", "configs.common", "__future__", "typing"}, (f, mods)
