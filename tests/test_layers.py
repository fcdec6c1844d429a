"""The package's layers: every module imports only from its own layer or the ones below, and the
engine and the IIF layer import no TRL (nor the trainers' Hugging Face stack above torch)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rlhf_influence"

# The package's folders from the bottom: engine/ (LoRA layout, capture, projection, per-record
# gradients, influence, log-probs and targets), iif/ (records, per-record losses, algorithm specs,
# filter decision, the filter, settings, KL), store/ (its schema, writer and reader), trainer/ and
# audit/ (side by side: neither imports the other), and the launch support (launch/, tasks/, the CLI).
LAYERS = {
    "engine": (0, ["engine"]),
    "iif": (1, ["iif"]),
    "store": (2, ["store"]),
    "trainers": (3, ["trainer"]),
    "audit": (3, ["audit"]),
    "launch": (4, ["launch", "tasks", "cli", "__init__"]),
}
NO_TRL = ("engine", "iif", "store", "audit")


def layer_of(module: str) -> str:
    """The layer of ``module`` (a dotted name inside the package, e.g. ``trainer.group``)."""
    top = module.split(".")[0]
    for layer, (_, members) in LAYERS.items():
        if top in members:
            return layer
    raise AssertionError(f"rlhf_influence.{module} is in no layer: add it to LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)] = path
    return found


def imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(the package's modules ``module`` imports, the outside top-level packages it imports)."""
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    inside, outside = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = ".".join([*base, *([node.module] if node.module else [])])
            if node.module:
                inside.add(target)
            else:  # from . import name: each name is a module of that package (or an attribute of it)
                inside |= {".".join([*base, alias.name]) if base else alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            (inside if node.module.startswith("rlhf_influence") else outside).add(
                node.module.removeprefix("rlhf_influence.").split(".")[0]
                if not node.module.startswith("rlhf_influence")
                else node.module.removeprefix("rlhf_influence.")
            )
        elif isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
    return {name for name in inside if name}, outside


def test_every_module_is_in_a_layer():
    for module in modules():
        layer_of(module)


def resolved(target: str, known: dict[str, Path]) -> str:
    """The module an import names: ``from . import __version__`` names the package's ``__init__``,
    ``from .trainer import IIFPPOTrainer`` the package ``trainer``."""
    parts = target.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts) or "__init__"


def test_no_module_imports_a_layer_above_it():
    upward, known = [], modules()
    for module, path in known.items():
        layer = layer_of(module)
        rank = LAYERS[layer][0]
        for target in imports(module, path)[0]:
            target_layer = layer_of(resolved(target, known))
            if target_layer != layer and LAYERS[target_layer][0] >= rank:
                upward.append(f"{module} ({layer}) imports {target} ({target_layer})")
    assert not upward, "\n".join(upward)


def test_the_lower_layers_import_no_trl():
    found = [
        f"{module} imports {name}"
        for module, path in modules().items()
        if layer_of(module) in NO_TRL
        for name in imports(module, path)[1]
        if name in ("trl", "accelerate", "deepspeed")
    ]
    assert not found, "\n".join(found)


def test_the_walk_sees_an_upward_import(tmp_path):
    """The check itself: a module of the engine importing the store is caught."""
    path = tmp_path / "capture.py"
    path.write_text("from ..store import AttributionStore\nimport trl\n")
    inside, outside = imports("engine.capture", path)
    assert inside == {"store"} and "trl" in outside
    assert LAYERS[layer_of("store")][0] > LAYERS[layer_of("engine.capture")][0]
