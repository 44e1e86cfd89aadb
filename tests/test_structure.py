"""The shape of the code (issue 14): layers, imports at the top, functions that fit a screen.

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
    ["runs", "flags"],
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


# The only imports allowed inside functions, by top-level module, and why. Everything else is
# imported at the top of its module.
LAZY = {
    "fulora": "cli.py only: a command imports its stage when it runs, so `fulora --help` and "
    "`fulora data inspect` start in well under a second",
    "diffusers": "the diffusion stack takes seconds to import; experiment/planner imports every "
    "stage module, and commands that never run a diffusion model must not pay for it",
    "transformers": "as diffusers",
    "peft": "as diffusers",
    "accelerate": "as diffusers",
    "huggingface_hub": "as diffusers (and only needed to resolve a hub id)",
    "safetensors": "as diffusers, where it reads LoRA and weights files",
    "bitsandbytes": "optional: 8-bit AdamW on CUDA only, absent on most CPU machines",
    "torch_fidelity": "audit only, heavy, and its Inception path needs a weights file",
    "torchmetrics": "audit only (SSIM), heavy",
    "scipy": "audit only",
    "timm": "only for timm architectures; takes a second to import",
    "torchvision": "the model zoo and transforms v2 load only when a classifier is built",
    "ray": "optional (fulora[ray]): only --executor ray imports it, and says how to get it",
    "sklearn": "t-SNE and the patient split only; data.manifest is imported by every command",
    "torch": "config.py only: it is imported by every command, torch only by require_device",
}


LAZY_ONLY_IN = {"fulora": "cli.py", "torch": "config.py"}
# fulora modules that subclass diffusers' classes, so that importing them imports diffusers:
# where each may be imported inside a function, as diffusers itself is
LAZY_FULORA = {
    "fulora.generate.a1111_schedulers": "samplers.py",
    "fulora.generate.kdiffusion_schedulers": "samplers.py",
}


def _imported(node: ast.Import | ast.ImportFrom, name: str) -> str:
    """The module an import brings in (``from a.b import c`` brings in ``a.b.c`` if c is one)."""
    if isinstance(node, ast.ImportFrom):
        return ".".join([name, *[alias.name for alias in node.names][:1]])
    return name


def test_imports_inside_functions_are_only_the_listed_lazy_ones():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                elif isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    only_in = LAZY_ONLY_IN.get(top)
                    allowed = top in LAZY and (only_in is None or path.name == only_in)
                    allowed |= LAZY_FULORA.get(_imported(node, name)) == path.name
                    if not allowed:
                        found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {name}")
    assert not found, "imports inside functions with no stated reason:\n" + "\n".join(found)


MAX_LINES = 80
# Functions over MAX_LINES, each with the most lines it may have: a ratchet, empty since issue
# 14's splits. Not a place to add to; the test fails when one grows, and when one is split
# without being taken off the list.
TOO_LONG: dict[str, int] = {}


def _function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{path.relative_to(SRC).as_posix()}:{node.name}"
                lengths[name] = max(lengths.get(name, 0), node.end_lineno - node.lineno + 1)
    return lengths


def test_functions_fit_on_a_screen():
    lengths = _function_lengths()
    too_long = {name: n for name, n in lengths.items() if n > TOO_LONG.get(name, MAX_LINES)}
    assert not too_long, f"functions over {MAX_LINES} lines (split them): {too_long}"
    split = [name for name in TOO_LONG if lengths.get(name, 0) <= MAX_LINES]
    assert not split, f"now short enough: take them off TOO_LONG: {split}"
