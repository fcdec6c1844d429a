"""The recipes (recipes/ppo_iif.py, recipes/grpo_iif.py, recipes/rloo_iif.py) loaded as modules, for the tests that call their main."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load_recipe(algorithm: str) -> ModuleType:
    """``recipes/<algorithm>_iif.py``, freshly executed (``algorithm``: "ppo", "grpo" or "rloo")."""
    spec = importlib.util.spec_from_file_location(f"{algorithm}_iif_recipe", RECIPES / f"{algorithm}_iif.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
