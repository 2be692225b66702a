"""Devices, mesh and shardings of a training run, over one or several processes.

The mesh has axes ``("data", "fsdp")``. The batch is split over both (each device holds
``B / (data·fsdp)`` rows); parameters and optimizer state are replicated over ``data`` and
split over ``fsdp`` by the rules :func:`param_spec` applies (FSDP: each device stores
1/fsdp of every large tensor and XLA gathers it for the matmul). With several processes
the devices are ordered by process, so each process holds one contiguous block of the batch
rows and samples only those (:meth:`Topology.host_rows`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rwkv_jax.config import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


@dataclasses.dataclass(frozen=True)
class Topology:
    """The mesh and the process layout of one run."""

    mesh: Mesh
    process_index: int
    process_count: int

    @property
    def primary(self) -> bool:
        """The one process with side effects (logs, metrics, exports)."""
        return self.process_index == 0

    @property
    def n_devices(self) -> int:
        return self.mesh.devices.size

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return self.sharding(P())

    def batch_sharding(self, ndim: int, batch_axis: int) -> NamedSharding:
        """Arrays whose axis ``batch_axis`` is the batch, split over the batch axes."""
        spec = [None] * ndim
        spec[batch_axis] = BATCH_AXES
        return self.sharding(P(*spec))

    def host_rows(self, batch: int) -> tuple[int, int]:
        """(host_index, host_count): this process's devices hold global batch rows
        ``host_index·B/host_count ..`` of a batch of ``batch`` rows, one contiguous block."""
        if self.process_count == 1:
            return 0, 1
        shard = self.batch_sharding(2, 0)
        rows = {idx[0].indices(batch)[:2]
                for idx in shard.addressable_devices_indices_map((batch, 1)).values()}
        lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
        size = hi - lo
        if (size * self.process_count != batch or lo % size
                or sum(b - a for a, b in rows) != size):
            raise RuntimeError(f"process {self.process_index}: batch rows {sorted(rows)} are "
                               f"not one block of {batch}/{self.process_count}")
        return lo // size, batch // size

    def global_batch(self, local: np.ndarray, batch_axis: int) -> jax.Array:
        """The global array of which this process holds the rows ``local`` (its block of
        :meth:`host_rows`; with one process, all of them), split over the batch axes."""
        sharding = self.batch_sharding(local.ndim, batch_axis)
        if self.process_count == 1:
            return jax.device_put(local, sharding)
        shape = list(local.shape)
        shape[batch_axis] *= self.process_count
        return jax.make_array_from_process_local_data(sharding, local, tuple(shape))

    def put_replicated(self, tree) -> Any:
        """Host values every process computed alike -> replicated global arrays."""
        if self.process_count == 1:
            return jax.device_put(tree, self.replicated)
        return jax.device_put(jax.device_get(tree), self.replicated)


def _resolve(data: int, fsdp: int, n: int) -> tuple[int, int]:
    """Mesh sizes with -1 filling the remaining devices; ConfigError naming the key."""
    for key, v in (("mesh.data", data), ("mesh.fsdp", fsdp)):
        if v == 0 or v < -1:
            raise ConfigError(f"{key}: must be a positive number of devices or -1, got {v}")
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh.data and mesh.fsdp cannot both be -1 (which one fills the "
                          "devices?)")
    if data == -1:
        if n % fsdp:
            raise ConfigError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    elif fsdp == -1:
        if n % data:
            raise ConfigError(f"mesh.data={data} does not divide the {n} devices")
        fsdp = n // data
    if data * fsdp > n:
        raise ConfigError(f"mesh.data x mesh.fsdp = {data} x {fsdp} = {data * fsdp} devices, "
                          f"but only {n} are available")
    return data, fsdp


def build_topology(data: int, fsdp: int, batch_size: int) -> Topology:
    """The mesh of ``data x fsdp`` devices (-1: the rest) for a global batch of
    ``batch_size`` rows. Several processes: the same number of devices from each, in process
    order. ConfigError naming ``mesh.*`` / ``train.batch_size`` when it cannot be built."""
    p_index, p_count = jax.process_index(), jax.process_count()
    devices = jax.devices()
    data, fsdp = _resolve(data, fsdp, len(devices))
    n = data * fsdp
    if batch_size % n:
        raise ConfigError(f"train.batch_size={batch_size} must be a multiple of the "
                          f"{data} x {fsdp} = {n} devices of the mesh (mesh.data x mesh.fsdp)")
    if p_count > 1:
        local = jax.local_device_count()
        if n % p_count or n // p_count > local:
            raise ConfigError(f"mesh.data x mesh.fsdp = {n}: with {p_count} processes of "
                              f"{local} devices each, needs a multiple of {p_count} up to "
                              f"{p_count * local}")
        per = n // p_count
        by_process: dict[int, list] = {}
        for d in devices:
            by_process.setdefault(d.process_index, []).append(d)
        chosen = [d for p in sorted(by_process)
                  for d in sorted(by_process[p], key=lambda d: d.id)[:per]]
    else:
        chosen = devices[:n]
    mesh = Mesh(np.array(chosen).reshape(data, fsdp), AXES)
    return Topology(mesh, p_index, p_count)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """FSDP placement of one parameter: its largest dimension divisible by ``fsdp`` is split
    over the ``fsdp`` axis (ties: the last such dimension, so ``[out, in]`` matrices split
    ``in``); tensors with no such dimension, or smaller than 2**12 elements (vectors and
    mixing coefficients: not worth a gather), stay replicated."""
    if fsdp == 1 or math.prod(shape) < (1 << 12):
        return P()
    best = None
    for axis, size in enumerate(shape):
        if size % fsdp == 0 and (best is None or size >= shape[best]):
            best = axis
    if best is None:
        return P()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return P(*spec)


def tree_shardings(topology: Topology, tree) -> Any:
    """A sharding for every array leaf of ``tree`` (parameters or optimizer state, which
    mirrors their shapes): :func:`param_spec` over the mesh's ``fsdp`` axis."""
    fsdp = topology.mesh.shape["fsdp"]
    return jax.tree.map(lambda x: topology.sharding(param_spec(tuple(np.shape(x)), fsdp)),
                        tree)


def bytes_per_device(tree) -> int:
    """Bytes of ``tree``'s arrays held on one device (the first), after sharding."""
    total = 0
    for x in jax.tree.leaves(tree):
        if hasattr(x, "addressable_shards") and x.addressable_shards:
            shard = x.addressable_shards[0].data
            total += shard.size * shard.dtype.itemsize
        else:
            total += np.size(x) * np.dtype(x.dtype).itemsize
    return total
