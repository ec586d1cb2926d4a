"""The layer rule of the package: every `repa_jax` import, at module level or not, goes to a lower layer (or stays in
its own package), none sits inside a function, and configs/ import only `config` and `specs`."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = {"config": 0, "specs": 0, "models": 1, "objectives": 1, "convert": 2, "data": 3, "train": 4, "sample": 5,
          "evaluate": 6, "validate": 7, "main": 8}


def package(module: str) -> str:
  """'repa_jax.train.step' -> 'train'."""
  return module.split(".")[1]


def repa_imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
  """(module, line, inside a function) of every `repa_jax...` import in a file."""
  tree = ast.parse(path.read_text())
  in_functions = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef,
                                                                                   ast.AsyncFunctionDef))
                  for node in ast.walk(function)}
  found = []
  for node in ast.walk(tree):
    names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
             [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
    found += [(name, node.lineno, id(node) in in_functions) for name in names if name.startswith("repa_jax.")]
  return found


SOURCES = sorted(ROOT.glob("repa_jax/**/*.py")) + sorted(ROOT.glob("configs/*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
  relative = path.relative_to(ROOT)
  own = "configs" if relative.parts[0] == "configs" else (relative.with_suffix("").parts + ("",))[1]
  if own == "__init__":
    return
  for module, line, in_function in repa_imports(path):
    where = f"{relative}:{line} imports {module}"
    assert not in_function, f"{where} inside a function"
    target = package(module)
    if own == "configs":
      assert target in ("config", "specs"), f"{where}: configs/ import only config and specs"
    elif target != own:
      assert LAYERS[target] < LAYERS[own], f"{where}, a layer above {own}"


def test_every_package_has_a_layer():
  packages = {p.relative_to(ROOT / "repa_jax").with_suffix("").parts[0] for p in ROOT.glob("repa_jax/**/*.py")}
  assert packages - {"__init__"} <= set(LAYERS), packages - set(LAYERS)
