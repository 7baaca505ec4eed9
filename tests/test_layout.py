"""The shape of the code base: the app bundle Flower builds holds the apps and what they import,
and no operator tooling; shared/ depends on neither app; no module imports itself back through
others; reading a config loads no model code."""

from __future__ import annotations

import ast
import io
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

REPO = Path(__file__).parents[1]
PACKAGES = ("client", "coordinator", "shared", "simulations")
OPERATOR_TOOLING = ("simulations/cli.py", *(f"simulations/operations/{name}.py" for name in
                                           ("deployment", "credentials", "wire_audit", "local_superlink", "gpu_kit")))
OPERATOR_PACKAGES = ("cryptography", "psutil", "tomli_w", "h11")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def _imports(path: Path, module_level_only: bool) -> set[str]:
    """The modules `path` imports (`from a.b import c` counts as a.b and a.b.c); with
    `module_level_only`, what runs at import time (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _project_imports(path: Path, modules: dict[str, Path], module_level_only: bool) -> set[str]:
    return {name for name in _imports(path, module_level_only) if name in modules}


@pytest.fixture(scope="module")
def bundle() -> list[str]:
    fab = build_fab_from_disk(REPO)
    assert len(fab) < 10_000_000  # Flower's cap on an app bundle
    return zipfile.ZipFile(io.BytesIO(fab)).namelist()


def test_the_app_bundle_carries_no_operator_tooling(bundle):
    assert "client/client_app.py" in bundle and "coordinator/server_app.py" in bundle
    assert not [name for name in bundle if name in OPERATOR_TOOLING or name.startswith("tests/")]


def test_the_app_bundle_holds_every_module_its_modules_import(bundle):
    modules = _modules()
    bundled = {_module_name(REPO / name) for name in bundle if name.endswith(".py")}
    missing = {
        f"{module} imports {imported}"
        for module in bundled
        for imported in _project_imports(modules[module], modules, module_level_only=False)
        if imported not in bundled
    }
    assert not missing
    third_party = set().union(*(_imports(modules[m], module_level_only=False) for m in bundled))
    assert not {name.split(".")[0] for name in third_party} & set(OPERATOR_PACKAGES)


def test_the_default_users_builder_ships_in_the_bundle(bundle):
    from client.node_store import users_builder
    from shared.run_config import RunConfig

    name = RunConfig().users.builder
    assert callable(users_builder(name))
    assert f"{name.split(':')[0].replace('.', '/')}.py" in bundle


def test_shared_imports_neither_app_and_the_apps_not_each_other():
    modules = _modules()
    # A simulated device gets its user stores through the run config's users-builder, by name:
    # the product's code imports nothing from simulations/.
    rules = {"shared": ("client", "coordinator", "simulations"), "client": ("coordinator", "simulations"),
             "coordinator": ("client", "simulations")}
    broken = [
        f"{module} imports {imported}"
        for module, path in modules.items()
        for imported in _project_imports(path, modules, module_level_only=False)
        if imported.split(".")[0] in rules.get(module.split(".")[0], ())
    ]
    assert not broken


def test_no_module_imports_itself_back_through_others():
    modules = _modules()
    # Imports inside functions count too: deferring one hides a cycle, it does not remove it.
    graph = {m: _project_imports(p, modules, module_level_only=False) - {m} for m, p in modules.items()}
    # A package's __init__ that re-exports its modules is not a cycle with them.
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    cycles, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join([*trail[trail.index(imported):], imported]))
            elif imported not in state:
                visit(imported, [*trail, imported])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles


@pytest.mark.parametrize("reading", [
    "import shared.run_config as c; c.RunConfig.from_flower({'train.method': 'dce-only'}); c.TrainConfig()",
    "import simulations.cli as cli; cli.build_parser().parse_args(['compare', '--max-steps', '2'])",
])
def test_reading_a_config_or_the_command_line_loads_no_model_code(reading):
    probe = (f"import sys; {reading}; "
             "print(sorted(m for m in ('torch', 'bitsandbytes', 'peft', 'transformers') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_the_architecture_page_names_every_module_where_it_lives():
    page = (REPO / "docs" / "architecture.md").read_text()
    layout = page.split("## What is where", 1)[1].split("\n## ", 1)[0]
    sections = {}
    for package in PACKAGES:  # the text from "<package>/" to the next package's heading
        start = layout.index(f"\n{package}/")
        ends = [layout.find(f"\n{other}/", start + 1) for other in (*PACKAGES, "tests")]
        sections[package] = layout[start: min(end for end in ends if end > start)]
    unnamed = [
        str(path.relative_to(REPO)) for package in PACKAGES for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py" and path.name not in sections[package]
        and not (path.name.startswith("bench_") and "bench_*.py" in sections[package])
        and f"{path.parent.name}/" not in sections[package].replace(f"{package}/", "", 1)
    ]
    assert not unnamed


def test_ci_runs_the_readme_test_command_and_the_readme_stays_short():
    readme = (REPO / "README.md").read_text()
    command = readme.split("Set everything up and run the tests", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert command in (REPO / ".ci" / "run").read_text()
    assert len(readme.splitlines()) <= 250
    linked = re.findall(r"\]\(((?:docs|simulations)/[^)#]+)", readme)
    assert linked and [link for link in linked if not (REPO / link).exists()] == []
