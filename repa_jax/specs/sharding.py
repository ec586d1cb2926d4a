"""The one mesh convention of the project, axes ('data', 'fsdp'), and where arrays lie on it: FSDP shardings for the
state, the batch split over every axis (also the activations inside the train step), replicated weights. Train,
sample, precompute and evaluate all build their mesh here."""
import math
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
FSDP_AXIS = "fsdp"
MIN_SHARDED_SIZE = 2**14  # arrays smaller than this (biases, norms, scalars) are replicated


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None, dcn_shape: Sequence[int] | None = None) -> Mesh:
  """A mesh over all devices (or `devices`), laid out on the chips' physical topology (mesh_utils); one entry of
  `shape` may be -1 to take the remaining devices. `dcn_shape` (one entry per axis) spans several TPU slices: `shape`
  is then each slice's mesh, and the mesh's axis i has shape[i] * dcn_shape[i] devices, dcn_shape[i] of them across
  slices (over the data-centre network: put the data axis there)."""
  devices = jax.devices() if devices is None else list(devices)
  if len(axes) != len(shape):
    raise ValueError(f"config.mesh.axes {tuple(axes)} and config.mesh.shape {tuple(shape)} differ in length")
  slices = 1
  if dcn_shape is not None:
    if len(dcn_shape) != len(axes) or min(dcn_shape) < 1:
      raise ValueError(f"config.mesh.dcn_shape {tuple(dcn_shape)}: give one positive entry per axis {tuple(axes)}")
    slices = math.prod(dcn_shape)
    if len(devices) % slices:
      raise ValueError(f"config.mesh.dcn_shape {tuple(dcn_shape)}: {len(devices)} devices do not split into {slices} "
                       "slices")
  per_slice = len(devices) // slices
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape {tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if per_slice % known:
      raise ValueError(f"config.mesh.shape {tuple(shape)}: {per_slice} devices are not divisible by {known}")
    shape[shape.index(-1)] = per_slice // known
  if math.prod(shape) != per_slice:
    raise ValueError(f"config.mesh.shape {tuple(shape)} needs {math.prod(shape)} devices, but {per_slice} exist"
                     f"{' per slice' if slices > 1 else ''}: set config.mesh.shape to multiply to {per_slice} (or "
                     "use -1 for one axis)")
  if dcn_shape is None:
    return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), tuple(axes))
  if not all(hasattr(d, "slice_index") for d in devices):
    raise ValueError(f"config.mesh.dcn_shape {tuple(dcn_shape)} needs TPU devices of several slices; these "
                     f"{devices[0].platform} devices know no slice: set config.mesh.dcn_shape=None")
  return Mesh(mesh_utils.create_hybrid_device_mesh(shape, dcn_shape, devices, allow_split_physical_axes=True),
              tuple(axes))


def config_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """The mesh of config.mesh (axes, shape, dcn_shape) over all devices (or `devices`)."""
  return make_mesh(config.mesh.axes, config.mesh.shape, devices, config.mesh.dcn_shape)


def data_mesh(devices=None) -> Mesh:
  """The mesh of pure data parallelism over `devices` (default: all), for sampling and precompute."""
  return make_mesh(AXES, (-1, 1), devices)


def sharded_spec(shape: Sequence[int], axes: tuple[str, ...], size: int, skip: int = 0) -> P | None:
  """Shard the largest axis (not among the first `skip`) divisible by `size` over the mesh axes `axes`; P() for a
  small array (or size 1); None when no axis divides."""
  if size == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
    return P()
  divisible = [i for i in np.argsort(shape)[::-1] if i >= skip and shape[i] % size == 0]
  if not divisible:
    return None
  spec = [None] * len(shape)
  spec[divisible[0]] = axes if len(axes) > 1 else axes[0]
  return P(*spec)


def state_sharding(abstract_state, mesh: Mesh):
  """NamedShardings for the train state {'step', 'params', 'opt_state', 'ema_params'} by each leaf's shape: the
  parameters over 'fsdp' (FSDP), the optimizer moments and the EMA over every axis (ZeRO-1: on a data mesh each device
  keeps 1 / devices of them; a step all-gathers the update). The stacked depth axis of the SiT blocks is never split.
  A large array that no axis divides is replicated with a warning naming it (pick a mesh that divides it)."""
  def leaf(path, x):
    group = path[0].key if path else None
    axes = (FSDP_AXIS,) if group == "params" else tuple(mesh.axis_names)
    size = math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
    skip = 1 if any(getattr(p, "key", None) == "blocks" for p in path) else 0
    spec = sharded_spec(x.shape, axes, size, skip)
    if spec is None:
      logging.warning("%s %s is replicated: none of its axes divides the %d devices of mesh axes %s",
                      jax.tree_util.keystr(path), tuple(x.shape), size, axes)
      spec = P()
    return NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


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


def gathered(w: jax.Array) -> jax.Array:
  """w replicated on the mesh made current by `jax.sharding.use_abstract_mesh` (an FSDP-sharded weight all-gathered
  where it is used); w unchanged outside one. For the conditioning path, whose activations ([B, D], one row per image)
  are smaller than its weights: without it XLA multiplies them where the weight shards lie and reshards the product
  (all-to-alls)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return w
  return jax.lax.with_sharding_constraint(w, P())


def gathered_dot_general(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
  """jax.lax.dot_general with the right operand (a weight) `gathered` first: nnx.Linear's dot_general for layers on
  the conditioning path."""
  return jax.lax.dot_general(lhs, gathered(rhs), *args, **kwargs)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  if global_batch % mesh.size:
    raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the {mesh.size} devices of the mesh "
                     f"{dict(mesh.shape)}: use a multiple of {mesh.size}")
