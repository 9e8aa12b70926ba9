"""The layering holds: no library module imports the harness, and the libraries do not import each other.

pallas_kernels is the bottom layer; dmc_jax and sdc_jax sit on it and never import one another; experiments (the
harness) sits on top. Checked statically (every import statement at any depth, and every string handed to
importlib.import_module / __import__) and dynamically (a process in which `experiments` cannot be imported loads
every library module and generates from a checkpoint through the Python API).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORBIDDEN = {  # package -> top-level packages it must not import
    "pallas_kernels": {"experiments", "dmc_jax", "sdc_jax"},
    "dmc_jax": {"experiments", "sdc_jax"},
    "sdc_jax": {"experiments", "dmc_jax"},
}


def _modules(package: str):
  for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
    for f in sorted(files):
      if f.endswith(".py"):
        yield os.path.join(dirpath, f)


def imported_names(source: str) -> list[tuple[int, str]]:
  """(line, dotted module) of every import in `source`: statements at any depth and literal import_module /
  __import__ arguments."""
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out.append((node.lineno, node.module))
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
        and isinstance(node.args[0].value, str):
      f = node.func
      name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
      if name in ("import_module", "__import__"):
        out.append((node.lineno, node.args[0].value))
  return out


def test_the_checker_sees_every_form_of_import():
  src = textwrap.dedent("""
      import experiments.harness
      def f():
        from experiments import cli
        import importlib
        importlib.import_module("experiments.dmc.train")
        __import__("experiments")
      class C:
        def g(self):
          if True:
            from experiments.harness.config import load
      """)
  assert [m for _, m in imported_names(src) if m.startswith("experiments")] == [
      "experiments.harness", "experiments", "experiments.dmc.train", "experiments", "experiments.harness.config"]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_library_module_imports_a_layer_it_must_not(package):
  bad = []
  for path in _modules(package):
    with open(path) as f:
      for line, name in imported_names(f.read()):
        if name.split(".")[0] in FORBIDDEN[package]:
          bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
  assert not bad, "\n".join(bad)


def test_libraries_work_without_the_harness(tmp_path, tiny_checkpoint):
  script = textwrap.dedent(f"""
      import sys, pkgutil, importlib
      sys.modules["experiments"] = None  # any import of the harness now raises ImportError
      for pkg in ("pallas_kernels", "dmc_jax", "sdc_jax"):
        mod = importlib.import_module(pkg)
        for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
          importlib.import_module(info.name)
      import dmc_jax
      model = dmc_jax.load({tiny_checkpoint!r})
      out = model.generate(["Hello world"], max_new_tokens=3)
      assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str), out
      assert "experiments" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
      print("OK", len(model.complete(["Hello world"], max_new_tokens=3).tokens[0]))
      """)
  env = {**os.environ, "PYTHONPATH": ROOT, "DMC_JAX_PROGRESS": "0"}
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ["OK", "3"]
