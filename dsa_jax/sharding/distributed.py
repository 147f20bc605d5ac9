"""Multi-host setup: flags for `jax.distributed.initialize`, and which rows of a global batch a host loads.

JAX docs, "Multi-host and multi-process environments": every process calls `jax.distributed.initialize`
before any other JAX call; afterwards `jax.devices()` lists the devices of all hosts, a `Mesh` over them
spans the cluster, and each process feeds only its addressable shards
(`jax.make_array_from_process_local_data`). On SLURM, JAX reads the coordinator, process count and id from
the environment when they are left unset (`jax._src.clusters.SlurmCluster`); `auto` does exactly that.
"""

import dataclasses
import os

import jax
import numpy as np
from absl import flags
from jax.sharding import NamedSharding

from dsa_jax.sharding import rules

_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (None: auto-detect, e.g. SLURM).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total processes, one per host (None: auto-detect).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes) (None: auto).")
_SINGLE_HOST = flags.DEFINE_bool("single_host", True, "Skip jax.distributed (one machine).")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Arguments of `jax.distributed.initialize`; all None = let JAX detect the cluster (SLURM, Open MPI, ...)."""
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  single_host: bool = True

  def __post_init__(self):
    given = [v is not None for v in (self.coordinator, self.num_processes, self.process_id)]
    if any(given) and not all(given):
      raise ValueError(f"DistributedConfig coordinator/num_processes/process_id={self.coordinator!r}/"
                       f"{self.num_processes!r}/{self.process_id!r} are invalid; allowed: all three or none.")
    if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"DistributedConfig.process_id={self.process_id!r} is invalid; allowed: "
                       f"0..{self.num_processes - 1}.")
    if self.coordinator is not None and ":" not in self.coordinator:
      raise ValueError(f"DistributedConfig.coordinator={self.coordinator!r} is invalid; allowed: 'host:port'.")

  @classmethod
  def from_flags(cls) -> "DistributedConfig":
    return cls(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _SINGLE_HOST.value)


def on_slurm() -> bool:
  return "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ


def initialize(cfg: DistributedConfig) -> None:
  """Connects this process to the others (no-op for a single host). Call before any other JAX call."""
  if cfg.single_host:
    return
  if cfg.coordinator is None and not on_slurm():
    raise ValueError("DistributedConfig without coordinator/num_processes/process_id needs a cluster JAX can "
                     "detect (SLURM: SLURM_JOB_ID and SLURM_PROCID set); allowed: pass all three flags.")
  jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                             process_id=cfg.process_id)


def host_rows(mesh, global_batch: int, seq_len: int, process_index: int | None = None) -> np.ndarray:
  """Rows of the global [B, T] batch whose shards live on this process's devices (sorted, no repeats).

  A host loads exactly these rows (e.g. `grain` with `batch_size = len(rows)` and its own shard of the
  documents); with context parallelism a host may hold only some sequence chunks of a row, but still
  tokenizes whole rows.
  """
  process_index = jax.process_index() if process_index is None else process_index
  sharding = NamedSharding(mesh, rules.batch_bt())
  rows = set()
  for device, index in sharding.devices_indices_map((global_batch, seq_len)).items():
    if device.process_index == process_index:
      rows.update(range(global_batch)[index[0]])
  return np.asarray(sorted(rows), np.int64)


def data_shard(mesh, global_batch: int, seq_len: int, process_index: int | None = None) -> tuple[int, int]:
  """(shard index, shard count) of this process's data (`pipeline.DataConfig.shard_index/shard_count`).

  The host's rows are one contiguous block of the batch (devices are listed host by host and the batch axes
  come first), so the block's place is the shard; hosts holding the same rows read the same documents.
  """
  process_index = jax.process_index() if process_index is None else process_index
  rows = host_rows(mesh, global_batch, seq_len, process_index)
  n = len(rows)
  if n == 0 or rows.tolist() != list(range(rows[0], rows[0] + n)) or rows[0] % n:
    raise ValueError(f"rows {rows.tolist()} of process {process_index} are invalid for a data shard; allowed: one "
                     "aligned block (keep the batch axes data, fsdp, expert outermost in the mesh).")
  return int(rows[0]) // n, global_batch // n


def global_batch(local: dict[str, np.ndarray], mesh, global_shape: tuple[int, int]) -> dict[str, jax.Array]:
  """This host's rows (in `host_rows` order) -> global arrays sharded by `rules.batch_bt` over the mesh."""
  sharding = NamedSharding(mesh, rules.batch_bt())
  return {k: jax.make_array_from_process_local_data(sharding, v, global_shape) for k, v in local.items()}
