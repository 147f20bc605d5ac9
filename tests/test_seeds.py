"""Fixed seeds in every test: no seed from the clock or the OS, no draw from NumPy's or Python's global generator
(so a failure reproduces). Greps the test sources, this file excepted."""

import pathlib
import re

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
FORBIDDEN = {
    "NumPy's global generator": r"\bnp\.random\.(?!default_rng\(|RandomState\(|Generator\b)\w+\(",
    "an unseeded NumPy generator": r"\b(default_rng|RandomState)\(\s*\)",
    "Python's global generator": r"(?<![\w.])random\.(seed|random|randint|randrange|choice|choices|shuffle|sample|"
                                 r"uniform|gauss)\(",
    "a seed from the clock or the OS": r"(key|PRNGKey|seed|default_rng|RandomState)\([^)\n]*\b(time|datetime|urandom)",
    "OS entropy": r"\bos\.urandom\(",
}


def _sources():
  return sorted(p for p in TESTS.rglob("*.py") if p != pathlib.Path(__file__).resolve())


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_no_unseeded_randomness(what):
  pattern = re.compile(FORBIDDEN[what])
  hits = [f"{path.relative_to(TESTS.parent)}:{n}: {line.strip()}" for path in _sources()
          for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
  advice = "use a fixed seed: np.random.default_rng(0), jax.random.key(0)"
  assert not hits, f"{what} in tests ({advice}):\n" + "\n".join(hits)


@pytest.mark.parametrize("line", ["x = np.random.randn(3)", "rng = np.random.default_rng()", "random.shuffle(xs)",
                                  "key = jax.random.key(int(time.time()))", "np.random.seed(0)", "os.urandom(8)"])
def test_patterns_catch(line):
  """Each forbidden use is caught by one pattern, and the fixed-seed forms are not."""
  assert any(re.search(p, line) for p in FORBIDDEN.values()), line
  for ok in ("rng = np.random.default_rng(0)", "jax.random.randint(key, (2,), 0, 5)", "np.random.RandomState(0)"):
    assert not any(re.search(p, ok) for p in FORBIDDEN.values()), ok
