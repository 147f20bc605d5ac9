"""The documented public API from a fresh `import dsa_jax`, in a subprocess (nothing imported by other tests
helps): every name and call in README.md and docs/ works as written, the load/forward/save example runs, and
`import dsa_jax` alone imports no JAX."""

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import FIXTURES, REPO

SCRIPT = textwrap.dedent("""
    import sys

    import dsa_jax

    assert "jax" not in sys.modules, "import dsa_jax should load nothing heavy"
    for name in ("load_hf", "save_hf", "forward", "apply", "init", "abstract_state", "count_params", "preset"):
      assert callable(getattr(dsa_jax, name)), name
    for name in ("ModelConfig", "MLAConfig", "IndexerConfig", "MoEConfig", "RopeConfig"):
      assert isinstance(getattr(dsa_jax, name), type), name
    for name in ("model", "checkpoint", "data", "training", "evaluation", "rl", "sampling", "sharding", "agent"):
      assert getattr(dsa_jax, name).__name__ == f"dsa_jax.{name}"

    import jax.numpy as jnp

    logp = jnp.log(jnp.full((2, 3), 0.5))
    loss, aux = dsa_jax.rl.grpo_loss(logp, logp, logp, logp, jnp.array([1.0, -1.0]), jnp.ones((2, 3)), eps=0.2,
                                     beta=0.0, delta=1.0)
    assert float(loss) == 0.0 and aux["seq_mask"].shape == (2,)  # equal policies, advantages summing to 0
    cfg = dsa_jax.preset("tiny")
    assert dsa_jax.count_params(dsa_jax.abstract_state(cfg)) > 0
    assert dsa_jax.model.LayerAux is not None and dsa_jax.model.ModelConfig is dsa_jax.ModelConfig
    with_names = {n for n in dir(dsa_jax) if not n.startswith("_")}
    assert {"rl", "forward", "training"} <= with_names, with_names
    print("ok")
""")


def test_readme_public_api_from_a_fresh_import():
  done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"\bdsa_jax(?:\.[A-Za-z_]\w*)+")

# Resolves every attribute chain in each piece of documented code from its own imports (or a plain
# `import dsa_jax`) and binds every call of a resolved callable to its signature; prints one line per problem.
CHECK_CODE = textwrap.dedent("""
    import ast, functools, importlib, importlib.util, inspect, json, sys

    def chain(node):
      names = []
      while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
      return (node.id, names[::-1]) if isinstance(node, ast.Name) else (None, [])

    for where, code in json.load(sys.stdin):
      tree = ast.parse(code)
      scope = {"dsa_jax": importlib.import_module("dsa_jax")}
      for node in ast.walk(tree):
        if isinstance(node, ast.Import):
          for a in node.names:
            module = importlib.import_module(a.name)
            scope[a.asname] = module if a.asname else importlib.import_module(a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
          for a in node.names:
            module = importlib.import_module(node.module)
            if not hasattr(module, a.name):  # as `from package import submodule` does
              importlib.util.find_spec(f"{node.module}.{a.name}") and importlib.import_module(f"{node.module}.{a.name}")
            try:
              scope[a.asname or a.name] = getattr(module, a.name)
            except AttributeError as e:
              print(f"{where}: from {node.module} import {a.name}: {e}")
      inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
      for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner and chain(node)[0] in scope:
          root, names = chain(node)
          try:
            functools.reduce(getattr, names, scope[root])
          except AttributeError as e:
            print(f"{where}: {'.'.join([root, *names])}: {e}")
        if isinstance(node, ast.Call) and chain(node.func)[0] in scope and all(k.arg for k in node.keywords) and \
           not any(isinstance(a, ast.Starred) or getattr(a, "value", None) is Ellipsis for a in node.args):
          root, names = chain(node.func)
          try:
            inspect.signature(functools.reduce(getattr, names, scope[root])).bind(
                *node.args, **{k.arg: None for k in node.keywords})
          except (AttributeError, TypeError) as e:
            print(f"{where}: {ast.unparse(node)[:80]}: {e}")
""")


def documented_code() -> list[tuple[str, str]]:
  """(where, code): each ```python block, each inline code span that is a Python expression naming dsa_jax, and
  each dotted dsa_jax name in the prose (as an expression after a plain `import dsa_jax`)."""
  pieces = []
  for path in DOCS:
    text, where = path.read_text(), str(path.relative_to(REPO))
    pieces += [(f"{where} block {i}", block) for i, block in enumerate(BLOCK.findall(text))]
    for span in SPAN.findall(BLOCK.sub("", text)):
      try:
        ast.parse(span, mode="eval")
      except SyntaxError:
        continue
      pieces += [(f"{where} `{span}`", span)] if "dsa_jax." in span else []
    pieces += [(f"{where} {name}", name) for name in sorted(set(DOTTED.findall(text)))]
  return pieces


def test_every_documented_name_and_call_works_as_written():
  pieces = documented_code()
  assert len(pieces) > 40 and any("grpo_loss(" in code for _, code in pieces)  # the extraction finds them
  done = subprocess.run([sys.executable, "-c", CHECK_CODE], cwd=REPO, capture_output=True, text=True, timeout=300,
                        input=json.dumps(pieces), env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0 and not done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("doc", ["README.md", "docs/api.md"])
def test_the_load_forward_save_snippet_runs_as_written(doc, tmp_path):
  """The document's load_hf / forward / save_hf example as written, on the HF fixture in a fresh process; only
  the checkpoint path, the output directory and `input_ids` are supplied."""
  (block,) = [b for b in BLOCK.findall((REPO / doc).read_text()) if "load_hf" in b]
  code = block.replace('"path/to/DeepSeek-V3.2"', repr(str(FIXTURES / "hf_deepseek_v32_tiny")))
  code = code.replace('"out_dir"', repr(str(tmp_path / "out")))
  prelude = "import numpy\ninput_ids = numpy.arange(12, dtype=numpy.int32).reshape(1, 12)\n"
  check = "\nassert logits.shape == (1, 12, config.vocab_size), logits.shape\nprint('ok')\n"
  done = subprocess.run([sys.executable, "-c", prelude + code + check], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
  assert (tmp_path / "out" / "config.json").exists()
