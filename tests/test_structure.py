"""The layout's rules, read from the source with ``ast``: no import cycle, ``suite`` never imports or
names ``spd``/``baselines``/``reports`` (they plug in through entry points), ``reports`` never
reaches torch, the CI gate never reaches the HTML renderer, and the model math is written once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("suite", "spd", "baselines", "reports")
PLUGINS = ("spd", "baselines", "reports")
TORCH = {"torch", "transformers", "lm_eval", "accelerate"}  # torch, or libraries that import it


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the project's packages under ``root``."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(tree: ast.Module, name: str, is_package: bool, top_level_only: bool) -> set[str]:
    """Dotted names imported by a module (relative imports resolved); optionally only at module level."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(parent + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def graph(root: Path, top_level_only: bool = False) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(project module -> project modules it imports, project module -> other top-level packages it imports)."""
    mods = modules(root)
    edges, external = {}, {}
    for name, path in mods.items():
        imported = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", top_level_only)
        edges[name] = {m for m in imported if m in mods and m != name}
        external[name] = {m.split(".")[0] for m in imported if m.split(".")[0] not in PACKAGES}
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def suite_naming_plugins(root: Path) -> list[str]:
    """Places where a ``suite`` module imports a plugin package or names one of its modules in a string."""
    found, mods = [], modules(root)
    plugin_modules = {m for m in mods if m.split(".")[0] in PLUGINS and "." in m}
    for name, path in mods.items():
        if not name.startswith("suite"):
            continue
        tree = ast.parse(path.read_text())
        for imported in _imports(tree, name, path.name == "__init__.py", top_level_only=False):
            if imported.split(".")[0] in PLUGINS:
                found.append(f"{name} imports {imported}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.split(":")[0] in plugin_modules
            ):
                found.append(f"{name} names {node.value!r}")
    return found


def reaches_torch(root: Path, start: str = "reports") -> dict[str, list[str]]:
    """Modules under ``start`` whose module-level imports reach torch: the chain that does."""
    edges, external = graph(root, top_level_only=True)
    out = {}
    for name in (m for m in edges if m == start or m.startswith(start + ".")):
        seen, todo = {name: [name]}, [name]
        while todo:
            current = todo.pop()
            if external[current] & TORCH:
                out[name] = seen[current] + sorted(external[current] & TORCH)
                break
            for nxt in edges[current] - set(seen):
                seen[nxt] = seen[current] + [nxt]
                todo.append(nxt)
    return out


# ---------------------------------------------------------------- the project itself


def test_no_import_cycle():
    edges, _ = graph(REPO)
    assert len(edges) > 30  # the checker reads the whole project
    assert cycles(edges) == []


def test_suite_never_imports_or_names_plugins():
    assert suite_naming_plugins(REPO) == []


def test_reports_never_reach_torch():
    assert reaches_torch(REPO) == {}


def test_command_modules_stay_light():
    """Command modules are imported to build the parser: bad arguments are answered before torch loads."""
    light = [m for m in modules(REPO) if m.startswith("suite.cli") or m in ("spd.cli", "reports.cli")]
    for name in light:
        assert reaches_torch(REPO, name) == {}, name


def import_chain(root: Path, start: str, target: str) -> list[str]:
    """How ``start`` reaches ``target`` through imports anywhere in the modules (a function's too); [] if not."""
    edges, _ = graph(root)
    seen, todo = {start: [start]}, [start]
    while todo:
        current = todo.pop()
        if current == target:
            return seen[current]
        for nxt in sorted(edges.get(current, set()) - set(seen)):
            seen[nxt] = seen[current] + [nxt]
            todo.append(nxt)
    return []


def test_gate_never_imports_the_renderer():
    """The CI gate shares the report's statistics (``reports.analysis``), not its HTML renderer."""
    assert import_chain(REPO, "reports.gate", "reports.analysis") == ["reports.gate", "reports.analysis"]
    assert import_chain(REPO, "reports.gate", "reports.render") == []


MODEL_MATH = {"RMSNorm": re.compile(r"\brsqrt\("), "SwiGLU": re.compile(r"\bsilu\(")}


def model_math(root: Path) -> dict[str, list[str]]:
    """For RMSNorm and SwiGLU, the project files that compute them."""
    return {
        what: [str(p.relative_to(root)) for p in modules(root).values() if pattern.search(p.read_text())]
        for what, pattern in MODEL_MATH.items()
    }


def test_model_math_is_written_once():
    assert model_math(REPO) == {"RMSNorm": ["suite/model/llama.py"], "SwiGLU": ["suite/model/llama.py"]}


# ---------------------------------------------------------------- the checker can fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    return tmp_path


def test_checker_finds_a_cycle_even_through_a_function_level_import(tmp_path):
    root = _tree(
        tmp_path, {"suite/a.py": "from suite.b import x\n", "suite/b.py": "def f():\n    from suite import a\n"}
    )
    assert cycles(graph(root)[0]) == [["suite.a", "suite.b"]]


def test_checker_finds_suite_importing_or_naming_a_plugin(tmp_path):
    root = _tree(
        tmp_path,
        {
            "suite/a.py": "def f():\n    import spd.strategy\n",
            "suite/b.py": "MODULES = ('baselines.ladder:Ladder',)\nNAME, FILE = 'spd', 'spd.jsonl'\n",
            "spd/strategy.py": "",
            "baselines/ladder.py": "",
        },
    )
    assert suite_naming_plugins(root) == ["suite.a imports spd.strategy", "suite.b names 'baselines.ladder:Ladder'"]


def test_checker_finds_reports_reaching_torch_through_suite(tmp_path):
    root = _tree(
        tmp_path,
        {
            "reports/render.py": "from suite.results import Row\n",
            "suite/results.py": "import json\nfrom suite.env import x\n",
            "suite/env.py": "import torch\n",
            "reports/fine.py": "def f():\n    import torch\n",
        },
    )
    assert reaches_torch(root) == {"reports.render": ["reports.render", "suite.results", "suite.env", "torch"]}


def test_checker_finds_the_gate_importing_the_renderer_through_another_module(tmp_path):
    root = _tree(
        tmp_path,
        {
            "reports/gate.py": "from reports.analysis import x\n",
            "reports/analysis.py": "def f():\n    from reports import render\n",
            "reports/render.py": "",
        },
    )
    chain = import_chain(root, "reports.gate", "reports.render")
    assert chain == ["reports.gate", "reports.analysis", "reports.render"]


def test_checker_finds_model_math_twice(tmp_path):
    root = _tree(
        tmp_path, {"suite/model/llama.py": "x * torch.rsqrt(v)\nF.silu(g) * u\n", "spd/shards.py": "F.silu(g) * u\n"}
    )
    assert model_math(root) == {
        "RMSNorm": ["suite/model/llama.py"],
        "SwiGLU": ["suite/model/llama.py", "spd/shards.py"],
    }
