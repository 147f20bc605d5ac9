"""What the Mosaic GPU kernel tests share: GPU interpret mode with race detection, and cross-lowering for an H200.

GPU interpret mode keeps the race-detection state of the last kernel it ran only (`gpu_callbacks.get_races()` is
replaced when the next kernel starts), so a forward and backward pass checked with `get_races()` afterwards would
check only the backward: `no_races` records the state of every kernel it interprets instead.

Cross-lowering runs the whole Mosaic GPU lowering on CPU; `lower_for_h200` also reads each kernel's launch back
from the lowered module (grid, block, dynamic shared memory, the ops it emits), so tests can assert on what the
GPU would run rather than on a string in the module.
"""

import collections
import contextlib
import dataclasses
from unittest import mock

import jax
from jax._src.interpreters import mlir as jax_mlir
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks  # race-detector state (private)
from jax.experimental.mosaic.gpu import core as mgpu_core  # the serialisation of kernel modules (private)
from jax.experimental.mosaic.gpu import dialect as mgpu_dialect
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh
from jaxlib.mlir import ir

SMEM_PER_BLOCK = 232448  # bytes of shared memory one Hopper block may have (227 KiB)
H200 = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind="NVIDIA H200", platform="gpu", num_cores=132))
INTERPRET = plgpu.InterpretGPUParams(detect_races=True)


@contextlib.contextmanager
def no_races(min_kernels: int = 1):
  """Yields a list that receives the race-detection state of every kernel interpreted inside; on exit asserts
  that at least `min_kernels` kernels ran and none found a race."""
  states = []

  class Recorded(gpu_callbacks.GPURaceDetectionState):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      states.append(self)

  gpu_callbacks.reset_gpu_interpret_mode_state()  # a failed earlier kernel may have left its state
  with mock.patch.object(gpu_callbacks, "GPURaceDetectionState", Recorded):
    yield states
  assert len(states) >= min_kernels, f"{len(states)} Mosaic GPU kernels ran in interpret mode, expected {min_kernels}+"
  raced = [i for i, state in enumerate(states) if state.races_found]
  assert not raced, f"races found in interpreted kernels {raced} of {len(states)}"


@dataclasses.dataclass(frozen=True)
class Launch:
  """One Mosaic GPU kernel of a lowered module."""
  grid: tuple[int, int, int]
  block: tuple[int, int, int]
  smem_bytes: int
  ops: collections.Counter  # op name -> count in the kernel module (e.g. "nvvm.vote.sync")
  asm: collections.Counter  # inline PTX string -> count

  def count(self, instruction: str) -> int:
    """How often the kernel emits `instruction`: an op name ("nvvm.vote.sync") or a piece of inline PTX
    ("wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3", "setmaxnreg")."""
    return self.ops[instruction] + sum(n for text, n in self.asm.items() if instruction in text)


@dataclasses.dataclass(frozen=True)
class Lowered:
  text: str  # the StableHLO module
  launches: list[Launch]


def lower_for_h200(fn, *args) -> Lowered:
  """jit(fn) lowered for an H200 on CPU (args: ShapeDtypeStructs) -> the module and its Mosaic GPU launches."""
  with jax.sharding.use_abstract_mesh(H200):
    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  kernels = []
  _walk(lowered.compiler_ir("stablehlo").operation, lambda op: kernels.append(op) if (
      op.name == "stablehlo.custom_call"
      and ir.StringAttr(op.attributes["call_target_name"]).value.startswith("mosaic_gpu")) else None)
  launches = [_launch(ir.StringAttr(op.attributes["mhlo.backend_config"]["module"]).value_bytes) for op in kernels]
  return Lowered(lowered.as_text(), launches)


def _walk(op, visit):
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        visit(child.operation)
        _walk(child.operation, visit)


def _launch(module_bytes: bytes) -> Launch:
  with jax_mlir.make_ir_context() as context, ir.Location.unknown():
    mgpu_dialect.register_dialect(context)
    context.allow_unregistered_dialects = True  # the serialised ops, until the serde pass restores them
    module = mgpu_core._run_serde_pass(ir.Module.parse(module_bytes), serialize=False)  # noqa: SLF001
    ops, asm, launches = collections.Counter(), collections.Counter(), []

    def visit(op):
      ops[op.name] += 1
      if op.name == "llvm.inline_asm":
        asm[ir.StringAttr(op.attributes["asm_string"]).value] += 1
      if op.name == "gpu.launch":  # operands: token, grid x y z, block x y z, dynamic shared memory bytes
        launches.append([ir.IntegerAttr(v.owner.attributes["value"]).value for v in list(op.operands)[1:8]])

    _walk(module.operation, visit)
  (values,) = launches
  return Launch(grid=tuple(values[:3]), block=tuple(values[3:6]), smem_bytes=values[6], ops=ops, asm=asm)
