"""The one mesh convention of the project, axes ('data', 'fsdp'), and where arrays lie on it: FSDP shardings for the
state, the batch split over every axis (also the activations inside the train step), replicated weights. Train,
sample, precompute and evaluate all build their mesh here."""
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
MIN_SHARDED_SIZE = 2**14  # arrays smaller than this (biases, norms, scalars) are replicated


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None) -> Mesh:
  """A mesh over all devices; one entry of `shape` may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  if len(axes) != len(shape):
    raise ValueError(f"config.mesh.axes {tuple(axes)} and config.mesh.shape {tuple(shape)} differ in length")
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape {tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if len(devices) % known:
      raise ValueError(f"config.mesh.shape {tuple(shape)}: {len(devices)} devices are not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"config.mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, but {len(devices)} exist: "
                     f"set config.mesh.shape to multiply to {len(devices)} (or use -1 for one axis)")
  return Mesh(np.asarray(devices).reshape(shape), tuple(axes))


def data_mesh(devices=None) -> Mesh:
  """The mesh of pure data parallelism over `devices` (default: all), for sampling and precompute."""
  return make_mesh(AXES, (-1, 1), devices)


def fsdp_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """Shard the largest axis divisible by the FSDP axis size; replicate small or indivisible arrays."""
  if fsdp_size == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  divisible = [i for i in np.argsort(shape)[::-1] if shape[i] % fsdp_size == 0]
  if not divisible:
    return P()
  spec = [None] * len(shape)
  spec[divisible[0]] = FSDP_AXIS
  return P(*spec)


def state_sharding(abstract_state, mesh: Mesh):
  """NamedShardings for every leaf of a state pytree (parameters, optimizer moments, EMA) by its shape."""
  fsdp_size = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size)), abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over every mesh axis: FSDP is data parallel too."""
  return NamedSharding(mesh, P(mesh.axis_names))


def constrain_batch(x: jax.Array) -> jax.Array:
  """x [B, ...] held batch-sharded (B over every axis) on the mesh made current by `jax.sharding.use_abstract_mesh`;
  x unchanged outside one. Activations pinned this way make XLA gather an FSDP layer's weights instead of resharding
  the activations (all-to-alls): on v5p-64 with mesh (1, 32), XL/2's step needs 8.7 instead of 86.7 GiB of
  temporaries per chip (benchmarks/tpu_compile.py)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  if global_batch % mesh.size:
    raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the {mesh.size} devices of the mesh "
                     f"{dict(mesh.shape)}: use a multiple of {mesh.size}")
