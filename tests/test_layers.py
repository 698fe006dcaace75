"""The layer picture holds: pipeline -> stages -> models, never upward, and stages never import MLflow.

Read from the source (the AST of every module), so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def _offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(_imports(path)):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_stages_import_neither_the_conductor_nor_mlflow():
    assert _offenders("stages", ("pipeline", "mlflow")) == []


def test_models_import_no_stage_and_no_conductor():
    assert _offenders("models", ("pipeline", "stages", "mlflow")) == []
