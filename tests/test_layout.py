"""The package's and the benchmarks' shape: no module over 450 lines, no function over 60 lines of code (argument
parser builders aside), and in the package no upward import."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "batched_specdec"
BENCHMARKS = PACKAGE.parent / "benchmarks"

LAYERS = [
    {"glossary", "checks", "model_info", "devices", "kernels", "prompts", "gguf_cache"},
    {"processors", "capture", "graphs"},
    {"attention", "ragged_cache", "forwards", "controller"},
    {"drafting"},
    {"options"},
    {"decode"},
    {"engine", "runner"},
    {"generation", "generation_config", "distributed", "models"},
    {"config", "report", "outputs", "main", "training", "__init__", "__main__"},
]
"""Each unit (a top-level module or subpackage of ``batched_specdec``) may import units of its own layer or below."""

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
EXEMPT_FUNCTIONS = {"build_parser"}  # argument parser builders: one add_argument per flag


def _layer_of(unit: str) -> int:
    for i, layer in enumerate(LAYERS):
        if unit in layer:
            return i
    raise AssertionError(f"batched_specdec.{unit} is in no layer of tests/test_layout.py: add it")


def _unit(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _imported_units(tree: ast.AST) -> set[str]:
    units = set()
    for node in ast.walk(tree):  # every import, also the lazy ones inside functions
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batched_specdec"):
            parts = node.module.split(".")
            if len(parts) > 1:
                units.add(parts[1])
            else:  # from batched_specdec import x: x is a unit or a public name of __init__
                units |= {alias.name for alias in node.names if (PACKAGE / alias.name).exists()
                          or (PACKAGE / f"{alias.name}.py").exists()} or {"__init__"}
        elif isinstance(node, ast.Import):
            units |= {a.name.split(".")[1] for a in node.names if a.name.startswith("batched_specdec.")}
    return units


def test_every_unit_is_in_a_layer():
    for path in _modules():
        _layer_of(_unit(path))


def test_no_module_imports_one_above_it():
    upward = []
    for path in _modules():
        unit = _unit(path)
        for other in _imported_units(ast.parse(path.read_text())) - {unit}:
            if _layer_of(other) > _layer_of(unit):
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports batched_specdec.{other}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_modules_and_functions_stay_small():
    too_big = []
    for path in _modules() + sorted(BENCHMARKS.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        if len(lines) > MAX_MODULE_LINES:
            too_big.append(f"{path.relative_to(PACKAGE.parent)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name in EXEMPT_FUNCTIONS:
                continue
            body = node.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # the docstring
            if not body:
                continue
            code = [line for line in lines[body[0].lineno - 1 : node.end_lineno]
                    if line.strip() and not line.strip().startswith("#")]
            if len(code) > MAX_FUNCTION_LINES:
                too_big.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}: {len(code)} lines")
    assert not too_big, "over the size limits:\n" + "\n".join(too_big)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The import scan sees lazy imports inside functions and both import forms."""
    tree = ast.parse("def f():\n    from batched_specdec.runner import x\nimport batched_specdec.main\n"
                     "from batched_specdec import decode\n")
    assert _imported_units(tree) == {"runner", "main", "decode"}
    assert _layer_of("main") > _layer_of("runner") > _layer_of("decode")
