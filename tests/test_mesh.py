"""The device mesh (repa_jax.specs.sharding.make_mesh / config_mesh): shapes, -1, slices, and the errors that name
the field to fix (the multi-slice mesh on TPU devices: tests/test_tpu_compile.py)."""
import jax
import pytest

from configs import tiny
from repa_jax.specs import sharding


def test_a_minus_one_takes_the_remaining_devices_in_their_order():
  mesh = sharding.config_mesh(tiny.get_config("reg=none"))  # shape (-1, 1) over the 8 CPU devices
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  assert [d.id for d in mesh.devices.ravel()] == [d.id for d in jax.devices()]
  assert dict(sharding.make_mesh(("data", "fsdp"), (2, -1)).shape) == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize("shape, dcn_shape, message", [
    ((3, -1), None, "not divisible by 3"),
    ((2, 2), None, "needs 4 devices, but 8 exist"),
    ((-1, -1), None, "at most one entry"),
    ((-1, 1), (3, 1), "do not split into 3 slices"),
    ((-1, 1), (2,), "one positive entry per axis"),
    ((-1, 1), (2, 1), "dcn_shape=None"),  # CPU devices belong to no slice
])
def test_bad_mesh_shapes_are_refused_naming_the_field(shape, dcn_shape, message):
  with pytest.raises(ValueError, match="config.mesh") as error:
    sharding.make_mesh(("data", "fsdp"), shape, dcn_shape=dcn_shape)
  assert message in str(error.value)
