"""Cross-lowering of Mosaic GPU kernels for an abstract H200 on a CPU-only jaxlib, and what each kernel became.

`lower_for_h200(fn, *args)` runs the whole Mosaic GPU lowering of `jax.jit(fn)` for CUDA under an abstract H200 mesh
(shared/docs/pallas_gpu_notes.md) and describes every Mosaic GPU kernel of the program: its CUDA grid and block,
its dynamic shared memory and the text of its lowered module, so that a test can assert on what can be wrong (the
launch shape, the shared memory, the instructions emitted) rather than on the mere presence of a kernel. The
description comes from Pallas's private `lower_jaxpr_to_module`, as pinned by jax==0.11.2.
"""

import dataclasses
import re
from unittest import mock

import jax
from jax._src.pallas.mosaic_gpu import lowering  # private: the lowered module, grid and block of each kernel

from tests.pallas_kernels.mosaic_checks import H200

SMEM_PER_BLOCK = 232448  # bytes of shared memory one Hopper block may have (227 KiB)


@dataclasses.dataclass(frozen=True)
class LoweredKernel:
  grid: tuple[int, int, int]  # CUDA (x, y, z)
  block: tuple[int, int, int]  # threads
  smem_bytes: int  # dynamic shared memory
  text: str  # the lowered module (NVVM / LLVM dialects, inline PTX)

  def count(self, instruction: str) -> int:
    return self.text.count(instruction)


def lower_for_h200(fn, *args) -> list[LoweredKernel]:
  """The Mosaic GPU kernels of jax.jit(fn)(*args) (ShapeDtypeStructs are enough), in lowering order."""
  jax.clear_caches()  # a cached lowering would not pass through `lower_jaxpr_to_module`
  results = []
  lower = lowering.lower_jaxpr_to_module

  def recording(*a, **k):
    results.append(lower(*a, **k))
    return results[-1]

  with mock.patch.object(lowering, "lower_jaxpr_to_module", recording), jax.sharding.use_abstract_mesh(H200):
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  kernels = []
  for result in results:
    text = str(result.module)
    smem = re.findall(r"dynamic_shared_memory_size %c(\d+)_i32", text)
    kernels.append(LoweredKernel(tuple(result.grid), tuple(result.block), int(smem[0]) if smem else 0, text))
  return kernels
