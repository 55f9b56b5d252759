"""ARCHITECTURE.md: imports flow down only (models ← engine ← backends ← kernel ← cli/server)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "llmos"
# cli sits on top: `llmos serve` starts the server, `llmos run` the kernel.
RANK = {"models": 0, "engine": 1, "backends": 2, "kernel": 3, "server": 4, "evals": 4, "cli": 5}
SHARED = {"errors"}  # boundary exceptions, importable from every layer


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "llmos" else None


def test_imports_flow_down_only() -> None:
    bad = []
    for path in ROOT.rglob("*.py"):
        here = path.relative_to(ROOT).parts[0]
        if here not in RANK:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                there = layer_of(name)
                if there is None or there in SHARED:
                    continue
                if (
                    there not in RANK
                    or RANK[there] > RANK[here]
                    or (RANK[there] == RANK[here] and there != here)
                ):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_scheduler_and_block_manager_do_not_use_torch() -> None:
    for name in ("scheduler.py", "block_manager.py", "sequence.py"):
        tree = ast.parse((ROOT / "engine" / name).read_text())
        mods = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.split(".")[0] == "torch" for m in mods if m), name
