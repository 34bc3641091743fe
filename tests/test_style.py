"""House rules that a test can check: ruff, snakefmt, Snakemake's linter, a thin
common.smk, the config schema agreeing with the results grammar, no import cycles."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mop.plan import MIXTURE, NAME, TASKS
from tests.conftest import REPO, snakemake, tiny_workdir

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    return shutil.which(name) or str(BIN / name)


def test_code_is_ruff_clean():
    result = subprocess.run(
        [_tool("ruff"), "check", "mop", "tests", "benchmarks"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_are_snakefmt_formatted():
    result = subprocess.run(
        [_tool("snakefmt"), "--check", "workflow"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_snakemake_lint_reports_nothing(tmp_path):
    result = snakemake(tiny_workdir(tmp_path), "--lint")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Snakemake's logger picks stdout or stderr by version and terminal; read both.
    output = result.stdout + result.stderr
    assert "Lints for" not in output, output[-3000:]
    assert "Congratulations, your workflow is in a good condition!" in output


def test_common_smk_is_thin():
    lines = (REPO / "workflow" / "rules" / "common.smk").read_text().splitlines()
    assert len(lines) < 120


MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 400


def _sizes() -> dict[str, int]:
    """Lines of every module of mop/ and of every function in it (decorators included)."""
    out = {}
    for path in sorted((REPO / "mop").rglob("*.py")):
        name = path.relative_to(REPO).as_posix()
        text = path.read_text()
        out[name] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                out[f"{name}:{node.name}"] = max(
                    out.get(f"{name}:{node.name}", 0), node.end_lineno - start + 1
                )
    return out


def test_functions_and_modules_are_short():
    """A newcomer reads the house in an afternoon: no function over ~80 lines, no module
    over ~400 (issue 25)."""
    sizes = _sizes()
    long = {
        name: n
        for name, n in sizes.items()
        if n > (MAX_FUNCTION_LINES if ":" in name else MAX_MODULE_LINES)
    }
    assert long == {}


def test_schema_names_follow_the_results_grammar():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    name = schema["$defs"]["name"]["pattern"]
    assert name.startswith("^" + NAME.removesuffix("*"))
    mixtures = schema["properties"]["finetune"]["properties"]["mixtures"]["items"]["pattern"]
    assert mixtures.replace("\\\\", "\\") == f"^({MIXTURE})$".replace("\\\\", "\\")
    assert schema["properties"]["analysis"]["properties"]["mixture"]["pattern"] == mixtures
    tasks = schema["properties"]["finetune"]["properties"]["tasks"]["items"]["enum"]
    assert tuple(tasks) == TASKS


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The mop modules a module imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                child = f"{node.module}.{a.name}"
                out.add(child if child in known else node.module)
    return {m for m in out if m in known and m != module}


def test_no_import_cycle_in_mop():
    root = REPO / "mop"
    files = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {m: _imports(p, m, set(files)) for m, p in files.items()}
    seen: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        seen[m] = 1
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n] if n in stack else [m, n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in seen:
                visit(n, [*stack, n])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [m])
    assert not any(m.startswith("mop.report") for m in graph["mop.topics"])
