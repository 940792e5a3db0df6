"""The package's layering, read from the source (no module is imported).

Layers, each importing only from itself and the layers before it:

    files -> core -> models -> data -> training -> sampling -> algorithms
         -> evaluate, analysis -> config_base, train -> sweep, main

No import cycle between modules, no import of a midpo module inside a
function (the listed exceptions only), no private name of another midpo
module used anywhere in the library, tests or benchmarks, and no algorithm
named in the generic trainer.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "midpo"

LAYERS = [
    ("midpo.files",),
    ("midpo.core",),
    ("midpo.models",),
    ("midpo.data",),
    ("midpo.training",),
    ("midpo.sampling",),
    ("midpo.algorithms",),
    ("midpo.evaluate", "midpo.analysis"),
    ("midpo.config_base", "midpo.train", "midpo.sweep_plan"),
    ("midpo.main", "midpo.sweep"),
]

# (module, imported module): imports inside a function that are allowed.
FUNCTION_IMPORTS = {
    # main.py starts jax.distributed before anything imports the trainer.
    ("midpo.main", "midpo.train"),
}

ALGORITHM_WORDS = (r"dice|tis_dpo|sparsepo|simpo|tdpo|hdpo|rdpo|mi|ema|constrained|cpo|orpo|"
                   r"alphapo|param_update")


def rel(path: pathlib.Path) -> str:
  return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(name: str) -> int:
  for i, group in enumerate(LAYERS):
    if any(name == g or name.startswith(g + ".") for g in group):
      return i
  raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def resolve(name: str, known) -> str:
  """``midpo.a.b`` -> the longest known module it names (``from midpo.a import b``
  names either the module ``midpo.a.b`` or a name in ``midpo.a``)."""
  while name not in known and "." in name:
    name = name.rsplit(".", 1)[0]
  return name


def imports(path: pathlib.Path, known) -> list[tuple[str, bool, int]]:
  """(imported midpo module, inside a function, line) of every import."""
  tree = ast.parse(path.read_text())
  out = []

  def visit(node, in_function):
    for child in ast.iter_child_nodes(node):
      nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                 ast.Lambda))
      if isinstance(child, ast.Import):
        for a in child.names:
          if a.name.startswith("midpo"):
            out.append((resolve(a.name, known), in_function, child.lineno))
      elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith(
          "midpo") and child.level == 0:
        for a in child.names:
          out.append((resolve(f"{child.module}.{a.name}", known), in_function, child.lineno))
      visit(child, nested)

  visit(tree, False)
  return out


def test_every_module_has_a_layer_and_imports_only_earlier_layers():
  known = modules()
  bad = []
  for name, path in known.items():
    for target, _, line in imports(path, known):
      if layer(target) > layer(name):
        bad.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[layer(name)]}) imports {target} "
                   f"({LAYERS[layer(target)]})")
  assert not bad, "imports from a later layer:\n" + "\n".join(bad)


def test_no_import_cycle():
  known = modules()
  graph = {name: {t for t, in_fn, _ in imports(path, known) if not in_fn and t != name}
           for name, path in known.items()}
  # A package's __init__ importing its own modules is not a cycle through them.
  for name in graph:
    graph[name] = {t for t in graph[name] if not (known[name].name != "__init__.py" and
                                                  name.startswith(t + "."))}
  state: dict[str, int] = {}
  stack: list[str] = []

  def dfs(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == 1:
        raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
      if m in graph and state.get(m) is None:
        dfs(m)
    stack.pop()
    state[n] = 2

  for n in sorted(graph):
    if state.get(n) is None:
      dfs(n)


def test_no_midpo_import_inside_a_function_but_the_listed_ones():
  known = modules()
  bad = [f"{path.relative_to(ROOT)}:{line} imports {target} inside a function"
         for name, path in known.items() for target, in_fn, line in imports(path, known)
         if in_fn and (name, target) not in FUNCTION_IMPORTS]
  assert not bad, "\n".join(bad)


def test_the_generic_trainer_names_no_algorithm():
  words = re.compile(rf"\b({ALGORITHM_WORDS})\b")
  bad = []
  for path in sorted((PACKAGE / "training").rglob("*.py")):
    for i, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#", 1)[0]
      if words.search(code):
        bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
  assert not bad, "the generic trainer names an algorithm:\n" + "\n".join(bad)


def _private_uses(path: pathlib.Path, known) -> list[str]:
  """``alias._name`` where ``alias`` is an imported midpo module."""
  tree = ast.parse(path.read_text())
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("midpo"):
          aliases[a.asname or a.name.split(".")[0]] = a.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("midpo"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        if full in known:
          aliases[a.asname or a.name] = full
  out = []
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      out.append(f"{rel(path)}:{node.lineno}: {node.value.id}.{node.attr}")
  return out


def test_no_private_name_of_another_module_is_used():
  known = modules()
  files = [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"),
           *(ROOT / "benchmarks").glob("*.py")]
  bad = [u for p in sorted(files) for u in _private_uses(p, known)]
  assert not bad, "private names used across modules (make them public):\n" + "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
  """The parsers find what they look for."""
  known = {"midpo.core.x": None, "midpo.train": None}
  src = tmp_path / "m.py"
  src.write_text("from midpo import train\n"
                 "def f():\n  from midpo.core import x\n  return train._private()\n")
  found = imports(src, known)
  assert ("midpo.train", False, 1) in found and ("midpo.core.x", True, 3) in found
  assert _private_uses(src, known) == [f"{src}:4: train._private"]
  assert layer("midpo.train") > layer("midpo.training.loop") > layer("midpo.core.stats")


MAX_LINES = 450  # "about 400": split a module before it grows past this


def test_no_module_is_too_long():
  long = {module_name(p): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_every_public_function_and_class_has_a_docstring():
  missing = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for node in ast.parse(path.read_text()).body:
      if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")
          and not ast.get_docstring(node)):
        missing.append(f"{rel(path)}:{node.lineno} {node.name}")
  assert not missing, "public names without a docstring:\n" + "\n".join(missing)
