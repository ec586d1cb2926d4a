"""The TPU compile report (benchmarks/tpu_compile.py): its HLO collective count against a hand-written module, and
the tiny config's train step AOT-compiled for a v5p slice (4 chips) on a data and an FSDP mesh, and for two slices,
and its sampler with an SD-VAE decoder and the precompute program (needs libtpu, the test extra's; skipped without
it)."""
import importlib.util

import pytest

from benchmarks import tpu_compile
from configs import tiny
from repa_jax.specs import sharding

HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %g = f32[4,8]{1,0} all-gather(f32[1,8]{1,0} %x), dimensions={0}
  %r = f32[8]{0} all-reduce(f32[8]{0} %y), to_apply=%add
}

%scan_cond (q: (s32[], f32[8])) -> pred[] {
  %c = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[] compare(s32[] %i, s32[]{:T(128)} %c), direction=LT
}

%scan_body (q: (s32[], f32[8])) -> (s32[], f32[8]) {
  %x = f32[2,8]{1,0} all-to-all(f32[2,8]{1,0} %y), dimensions={0}
  %ring = (u32[], bf16[4,8]) while((u32[], bf16[4,8]) %z), condition=%ring_cond, body=%ring_body
}

%ring_cond (r: (u32[], bf16[4,8])) -> pred[] {
  %n = u32[]{:T(128)} constant(16)
  ROOT %lt = pred[] compare(u32[] %j, u32[]{:T(128)} %n), direction=LT
}

%ring_body (r: (u32[], bf16[4,8])) -> (u32[], bf16[4,8]) {
  %cp = (bf16[4,8]{1,0:T(8,128)(2,1)}, bf16[4,8]{1,0:T(8,128)(2,1)}, u32[]{:T(128)}) collective-permute-start(bf16[4,8]{1,0} %w), source_target_pairs={{0,1},{1,0}}
  %cpd = bf16[4,8]{1,0} collective-permute-done((bf16[4,8], bf16[4,8], u32[]) %cp)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %s = bf16[2,8]{1,0} all-reduce-start(bf16[2,8]{1,0} %a), to_apply=%add
  %w = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %v = (s32[], f32[8]) while((s32[], f32[8]) %t), condition=%scan_cond, body=%scan_body
}
"""


def test_collectives_are_counted_per_loop_trip_with_their_bytes():
  """The known trip count (3), else the scan's bound in its condition (5), times a nested ring loop's unsigned bound
  (16, a windowed einsum's); bytes received: the result shape, of an async start's (operand, result, context) the
  result."""
  assert tpu_compile.collectives(HLO) == {"all-gather": (3, 3 * 4 * 8 * 4), "all-reduce": (4, 3 * 8 * 4 + 2 * 8 * 2),
                                          "all-to-all": (5, 5 * 2 * 8 * 4),
                                          "collective-permute": (5 * 16, 5 * 16 * 4 * 8 * 2)}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu-compile / test extra) is not "
                    "installed")
@pytest.mark.parametrize("mesh_shape", [(4, 1), (1, 4)])
def test_the_tiny_train_step_compiles_for_a_v5p_slice(mesh_shape):
  config = tiny.get_config("reg=both")
  config.mesh.shape = mesh_shape
  report = tpu_compile.compile_step(config, "v5p:2x2x1")
  assert len(report["devices"]) == 4 and report["mesh"] == {"data": mesh_shape[0], "fsdp": mesh_shape[1]}
  assert report["fits"] and 0 < report["used_bytes"] < 1e9
  assert report["collectives"]["all-reduce"][0] >= 1  # the gradients' mean over the data-parallel devices
  # The activations stay batch-sharded: the conditioning's weights are gathered (sharding.gathered) rather than its
  # [B, D] rows resharded (4 all-to-alls and 3 collective-permutes on the FSDP mesh without it).
  assert "all-to-all" not in report["collectives"]
  if mesh_shape[1] > 1:
    assert report["collectives"]["all-gather"][0] >= 1  # FSDP gathers the sharded weights
  moved = sum(nbytes for _, nbytes in report["collectives"].values())
  assert report["ideal_collective_bytes"] <= moved <= 1.5 * report["ideal_collective_bytes"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu-compile / test extra) is not "
                    "installed")
def test_the_tiny_train_step_compiles_for_two_slices_with_the_data_axis_across_them():
  config = tiny.get_config("reg=repa")
  config.mesh.update(shape=(1, 4), dcn_shape=(2, 1))  # FSDP inside each slice, data parallel over the two
  report = tpu_compile.compile_step(config, "v5p:2x2x1", num_slices=2)
  assert len(report["devices"]) == 8 and report["mesh"] == {"data": 2, "fsdp": 4}
  layout = sharding.config_mesh(config, report["devices"]).devices
  assert [[device.slice_index for device in row] for row in layout] == [[0] * 4, [1] * 4]
  assert report["fits"] and report["collectives"]["all-gather"][0] >= 1


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu-compile / test extra) is not "
                    "installed")
def test_the_sampler_compiles_for_a_v5p_slice_with_its_vae_decoder():
  config = tiny.get_config("reg=repa")
  config.data.update(autoencoder="sd-vae-ft-mse", autoencoder_spec=dict(  # f = 2: 8 x 8 x 4 latents -> 16 x 16 images
      block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4))
  config.sample.update(sampler="sde", steps=4, cfg_scale=2.0, batch_size=8)
  report = tpu_compile.compile_sampler(config, "v5p:2x2x1")
  assert report["fits"] and 0 < report["used_bytes"] < 1e9
  assert not report["collectives"].get("all-to-all")  # the batch stays on its devices


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu-compile / test extra) is not "
                    "installed")
def test_the_precompute_program_compiles_for_one_host_of_a_v5p_slice():
  """--mode=precompute's SD-VAE encoder and DINOv2 (tiny specs) on one host's chips, with no collective at all."""
  config = tiny.get_config("reg=repa")
  config.data.update(autoencoder="sd-vae-ft-mse", autoencoder_spec=dict(
      block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4))
  config.align.encoders = (("dinov2_vitb14", 16),)
  config.precompute.update(resolution=256, batch_size=4, encoder_specs={"dinov2_vitb14": dict(width=16, depth=1,
                                                                                             num_heads=2)})
  report = tpu_compile.compile_precompute(config, "v5p:2x2x1")
  assert report["chips"] == 4 and report["fits"] and 0 < report["used_bytes"] < 2e9  # 8 channels pad to 128 lanes
  assert report["collectives"] == {}  # each chip encodes its own images with its replica of the weights
