"""fulora's packages form layers: a package imports only packages below it (issue 14).

The graph is read from the source with the standard library's ``ast``, imports inside
functions included (they count for layering as much as those at the top), those under
``if TYPE_CHECKING:`` left out (they never run). DEVELOPERS.md draws the same layers.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fulora"

# Lowest first. A package may import its own modules and any package of a lower layer.
LAYERS = [
    ["errors"],
    ["fulora", "io", "planes"],  # "fulora": the package's __init__ (its version)
    ["config", "figures", "shipped"],
    ["runs"],
    ["data"],
    ["lora"],
    ["generate"],
    ["foundation"],
    ["classify"],
    ["evaluate"],
    ["audit"],
    ["report"],
    ["experiment"],
    ["demo"],
    ["cli"],
    ["__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fulora"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return hidden


def import_edges() -> set[tuple[str, str, str]]:
    """(importing package, imported package, file:line) for every fulora import."""
    edges = set()
    for path in sorted(SRC.rglob("*.py")):
        module = ".".join(("fulora", *path.relative_to(SRC).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        hidden = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in hidden:
                continue
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name == "fulora" or name.startswith("fulora."):
                    where = f"{path.relative_to(SRC.parent)}:{node.lineno}"
                    edges.add((_package(module), _package(name), where))
    return edges


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()}
    packages = {p for p in packages if not p.startswith("__") or p == "__main__"}
    packages = {"fulora" if p == "__init__" else p for p in packages} - {"__pycache__"}
    assert packages - {"fulora"} <= set(LAYER), sorted(packages - set(LAYER))


def test_packages_import_only_lower_layers():
    upward = sorted(
        f"{where}: {src} (layer {LAYER[src]}) imports {dst} (layer {LAYER[dst]})"
        for src, dst, where in import_edges()
        if src != dst and LAYER[dst] >= LAYER[src]
    )
    assert not upward, "imports that break the layers:\n" + "\n".join(upward)


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking():
    edges = {(src, dst) for src, dst, _ in import_edges()}
    assert ("experiment", "report") in edges  # runner imports the report inside a function
    assert ("classify", "figures") in edges
    assert ("evaluate", "experiment") not in edges
