"""Attribution with images split over 8 (fake CPU) devices equals one device.

The multi-device part runs in a subprocess, because the device count must be
set (XLA_FLAGS) before JAX is imported.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from drig import parallel

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from drig import attribution, parallel
    from drig.attribution import integration as ig_lib
    assert jax.device_count() == 8, jax.devices()
    DN = ("NHWC", "HWIO", "NHWC")

    def to_layer(p, x):
      h = jax.lax.conv_general_dilated(x, p["w1"], (1, 1), "SAME", dimension_numbers=DN)
      return jax.nn.relu(h + p["b1"])

    def from_layer(p, a):
      return jnp.tanh(jax.nn.softplus(a).mean(axis=(1, 2)) @ p["v"])

    def full(p, x):
      return from_layer(p, to_layer(p, x))

    rng = np.random.default_rng(0)
    p = {"w1": rng.normal(size=(3, 3, 3, 4)).astype(np.float32) * 0.5,
         "b1": rng.normal(size=(4,)).astype(np.float32) * 0.1,
         "v": rng.normal(size=(4,)).astype(np.float32)}
    x = rng.uniform(-1, 1, size=(5, 8, 8, 3)).astype(np.float32)  # 5: padded to 8
    b = attribution.half_gray_baseline(x)
    mesh = parallel.local_mesh()
    sharded_p = parallel.replicate(p, mesh)

    def check(name, ours, reference):
      for a, r in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(reference)):
        a, r = np.asarray(a), np.asarray(r)
        assert a.shape == r.shape, (name, a.shape, r.shape)
        scale = max(float(np.abs(r).max()), 1e-12)
        err = float(np.abs(a - r).max())
        assert err <= 1e-5 * scale, (name, err, scale)
      print("ok", name)

    for loop in ("python", "scan"):
      fn = lambda q: (lambda xs, bs: ig_lib._integrated_gradients(
          jax.tree_util.Partial(full, q), xs, bs, steps=6, method="gausslegendre",
          chunk_size=4, loop=loop))
      single = fn(p)(x, b)
      multi = parallel.sharded_call(fn(sharded_p), x, b, mesh=mesh)
      check("integrated_gradients/" + loop, multi, single)
      # The work really is split: each device holds one image's attributions.
      padded = parallel.shard_batch(jnp.concatenate([x, x[:3]]), mesh)
      attr, _ = fn(sharded_p)(padded, parallel.replicate(b, mesh))
      shapes = {s.data.shape for s in attr.addressable_shards}
      assert len(attr.addressable_shards) == 8 and shapes == {(1, 8, 8, 3)}, shapes

    tl, fl = (jax.tree_util.Partial(to_layer, q) for q in (p, sharded_p))
    hl, gl = (jax.tree_util.Partial(from_layer, q) for q in (p, sharded_p))
    kw = dict(steps=5, method="riemann_right", chunk_size=2)
    check("layer_integrated_gradients",
          parallel.sharded_call(
              lambda xs, bs: attribution.layer_integrated_gradients(fl, gl, xs, bs, **kw),
              x, b, mesh=mesh),
          attribution.layer_integrated_gradients(tl, hl, x, b, **kw))
    cot = attribution.channel_cotangents((8, 8, 4), np.tile([[0, 3]], (5, 1)))
    check("lesion_detection",
          parallel.sharded_call(
              lambda xs, bs: attribution.lesion_detection(fl, gl, xs, bs, k=2, **kw),
              x, b, mesh=mesh),
          attribution.lesion_detection(tl, hl, x, b, k=2, **kw))
    # One baseline per image is split too.
    per_image = np.broadcast_to(b, x.shape) + 0.01 * rng.normal(size=x.shape).astype(np.float32)
    f_single, f_multi = (jax.tree_util.Partial(full, q) for q in (p, sharded_p))
    check("per-image baselines",
          parallel.sharded_call(
              lambda xs, bs: attribution.integrated_gradients(f_multi, xs, bs, steps=4),
              x, per_image, mesh=mesh),
          attribution.integrated_gradients(f_single, x, per_image, steps=4))
    # Noise tunnels and GradientSHAP stack each image's samples beside it (image-major):
    # the images stay split over the devices, and the sums equal one device's.
    from drig.attribution import gradients
    key = jax.random.PRNGKey(3)
    distribution = rng.uniform(-1, 1, size=(3, 8, 8, 3)).astype(np.float32)
    padded = parallel.shard_batch(jnp.concatenate([x, x[:3]]), mesh)
    for name, call in (
        ("smoothgrad", lambda f, xs: gradients.smoothgrad(
            f, xs, key=key, samples=5, stdev=0.1, samples_per_call=2)),
        ("gradient_shap", lambda f, xs: gradients.gradient_shap(
            f, xs, distribution, key=key, samples=5, samples_per_call=2))):
      multi = call(f_multi, padded)
      check(name, np.asarray(multi)[:5], call(f_single, jnp.concatenate([x, x[:3]]))[:5])
      shapes = {s.data.shape for s in multi.addressable_shards}
      assert len(multi.addressable_shards) == 8 and shapes == {(1, 8, 8, 3)}, (name, shapes)
    print("ALL OK")
""")


@pytest.mark.multiprocess
def test_eight_fake_devices_equal_one_device():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=8").strip()
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "ALL OK" in result.stdout


def test_shard_batch_rejects_indivisible_batch():
  mesh = parallel.data_mesh(jax.devices()[:1])
  assert parallel.shard_batch(np.zeros((3, 2)), mesh).shape == (3, 2)
  mesh2 = jax.sharding.Mesh(np.array(jax.devices()[:1] * 2), ("data",))
  with pytest.raises(parallel.BatchSizeError, match="cannot be split over 2 devices"):
    parallel.shard_batch(np.zeros((3, 2)), mesh2)
