"""The README's public API from a fresh `import dsa_jax`, in a subprocess (nothing imported by other tests
helps): every documented name resolves without importing its subpackage first, and `import dsa_jax` alone
imports no JAX."""

import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

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
