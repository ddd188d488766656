"""The package's layering, read from its imports (``ast``): one-way, no cycles, nothing hidden.

The layer order is written once, here (docs/ARCHITECTURE.md draws it). A module may import its own
layer and the layers below it; the library never imports a command line, a config or absl flags;
an import inside a function says why on its line (``# lazy: <reason>``); no module imports
another that imports it back, directly or through others.
"""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = "cspine_jax"

# Bottom to top. Each entry names module prefixes; the first match decides a module's layer.
LAYERS = (
    ("core", ("cspine_jax.labels", "cspine_jax.metrics", "cspine_jax.aggregate",
              "cspine_jax.workers")),
    ("io", ("cspine_jax.io",)),
    ("synthetic", ("cspine_jax.synthetic",)),
    ("pp", ("cspine_jax.pp",)),
    ("localize", ("cspine_jax.localize",)),
    ("records", ("cspine_jax.records",)),
    ("inputs", ("cspine_jax.inputs",)),
    ("models", ("cspine_jax.models",)),
    ("train", ("cspine_jax.train",)),
    ("infer", ("cspine_jax.infer",)),
    ("report", ("cspine_jax.report",)),
    ("pipeline", ("cspine_jax.pipeline",)),
    # Command lines: thin absl programs at the edge (the package's top-level entry modules, the
    # data_prep/ commands, launch.py, evaluate.py); nothing imports them.
    ("cli", ("cspine_jax.predict", "cspine_jax.pseudo_labels", "cspine_jax.weights",
             "cspine_jax.launch_local", "cspine_jax.cli_setup", "data_prep", "launch", "evaluate")),
)
# Modules of the command-line layer that are not programs: the programs share them.
CLI_SUPPORT = ("cspine_jax.cli_setup", "data_prep.pp_flags")
# report draws what it is given: it reads only the leaves.
ONLY_FROM = {"report": ("core", "io")}
LAZY_MARK = "# lazy:"


def _modules() -> dict[str, pathlib.Path]:
  files = list((REPO / PACKAGE).rglob("*.py")) + list((REPO / "data_prep").glob("*.py"))
  files += [REPO / "launch.py", REPO / "evaluate.py"]
  out = {}
  for f in files:
    parts = list(f.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = f
  return out


MODULES = _modules()


def layer_of(module: str) -> int:
  if module == PACKAGE:  # the package's own __init__ holds nothing: below everything
    return 0
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  raise AssertionError(f"{module}: in no layer of tests/test_structure.py (add it to LAYERS)")


def _resolve(name: str) -> str | None:
  """The project module an import names (a module, or a package's module), else None."""
  while name:
    if name in MODULES:
      return name
    name = name.rpartition(".")[0]
  return None


def _imports(module: str) -> list[tuple[str, int, bool, str]]:
  """(imported project module, line, inside a function?, the line's text) of ``module``."""
  path = MODULES[module]
  text = path.read_text()
  lines = text.splitlines()
  tree = ast.parse(text)
  inner = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for sub in ast.walk(node):
        if isinstance(sub, (ast.Import, ast.ImportFrom)):
          inner.add(id(sub))
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names = [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      raise AssertionError(f"{path}:{node.lineno}: relative import; name the module in full")
    for name in names:
      target = _resolve(name)
      out.append((target or name, node.lineno, id(node) in inner, lines[node.lineno - 1]))
  return out


GRAPH = {m: sorted({t for t, *_ in _imports(m) if t in MODULES and t != m}) for m in MODULES}


def upward_imports(graph: dict[str, list[str]]) -> list[str]:
  """Every import of a module from a higher layer, or of a command line by another layer, or
  (report) of a layer it may not read."""
  found = []
  for module, targets in graph.items():
    mine = layer_of(module)
    allowed = ONLY_FROM.get(LAYERS[mine][0])
    for target in targets:
      theirs = layer_of(target)
      if theirs > mine:
        found.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), a "
                     "layer above it")
      elif (LAYERS[theirs][0] == "cli" and module.startswith(PACKAGE + ".") and
            target not in CLI_SUPPORT):
        found.append(f"{module} imports the command line {target}")
      elif allowed is not None and theirs != mine and LAYERS[theirs][0] not in allowed:
        found.append(f"{module} may import only {allowed}, not {target}")
  return found


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
  """Import cycles (each as the modules along it, the first repeated at the end)."""
  seen, stack, cycles = set(), [], []

  def visit(m):
    if m in stack:
      cycles.append(stack[stack.index(m):] + [m])
      return
    if m in seen:
      return
    seen.add(m)
    stack.append(m)
    for t in graph.get(m, ()):
      visit(t)
    stack.pop()

  for m in sorted(graph):
    visit(m)
  return cycles


def test_every_module_has_a_layer():
  for module in MODULES:
    layer_of(module)


def test_imports_point_down_the_layers():
  assert not upward_imports(GRAPH), "\n".join(upward_imports(GRAPH))


def test_no_import_cycles():
  cycles = find_cycles(GRAPH)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith(PACKAGE)))
def test_library_modules_import_no_config_and_no_flags(module):
  if layer_of(module) == len(LAYERS) - 1:
    return  # the package's own command lines
  for name, line, _, _ in _imports(module):
    assert not name.startswith(("configs", "data_prep", "launch", "evaluate")), (
        f"{MODULES[module]}:{line}: the library imports {name}")
    assert name not in ("absl.flags", "ml_collections.config_flags"), (
        f"{MODULES[module]}:{line}: flags belong to the command lines")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_inside_functions_say_why(module):
  for name, line, inside, text in _imports(module):
    if inside:
      assert LAZY_MARK in text, (f"{MODULES[module]}:{line}: `{text.strip()}` inside a function "
                                 f"without '{LAZY_MARK} <why>' on its line")


def test_the_checks_find_an_upward_import_and_a_cycle():
  graph = {
      "cspine_jax.models.convnext": ["cspine_jax.train.loop"],
      "cspine_jax.train.loop": ["cspine_jax.models.convnext"],
      "cspine_jax.report.plots": ["cspine_jax.infer.predict"],
      "cspine_jax.infer.predict": ["cspine_jax.predict"],
      "cspine_jax.pseudo_labels": ["cspine_jax.predict"],
  }
  found = upward_imports(graph)
  assert any(
      "cspine_jax.models.convnext (models) imports cspine_jax.train.loop" in f for f in found)
  assert any("cspine_jax.report.plots" in f for f in found)
  assert any(
      "cspine_jax.infer.predict (infer) imports cspine_jax.predict (cli)" in f for f in found)
  assert any(
      "cspine_jax.pseudo_labels imports the command line cspine_jax.predict" in f for f in found)
  assert find_cycles(graph) == [[
      "cspine_jax.models.convnext", "cspine_jax.train.loop", "cspine_jax.models.convnext"
  ]]
  with pytest.raises(AssertionError, match="in no layer"):
    layer_of("cspine_jax_other.thing")
