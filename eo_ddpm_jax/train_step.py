"""The train state and the one jitted train step: loss, gradients, AdamW, EMA.

Owns what runs on the devices each step and nothing else (no data, checkpoint or
logging I/O), so benchmarks can import it alone. The step is a pure function
`train_step(state, batch) -> (state, metrics)`: its noise comes from
`fold_in(state.rng, state.step)`, so a resumed run repeats an uninterrupted one.
"""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import layout as jax_layout

from eo_ddpm_jax import diffusion
from eo_ddpm_jax import schedules
from eo_ddpm_jax import unet

PyTree = Any


class TrainState(flax.struct.PyTreeNode):
  """Everything a step reads and writes; a plain pytree for sharding and Orbax.

  Attributes:
    step: int32 scalar, optimizer updates done so far.
    params: float32 U-Net parameters.
    ema_params: float32 exponential moving average of `params` (ema-pytorch schedule).
    opt_state: optax state of `create_optimizer`.
    rng: uint32 [2] base key; step noise is `fold_in(rng, step)`.
  """
  step: jax.Array
  params: PyTree
  ema_params: PyTree
  opt_state: PyTree
  rng: jax.Array


def create_learning_rate_fn(optim_config: ml_collections.ConfigDict,
                            total_steps: int) -> optax.Schedule:
  """Linear warm-up to `optim.learning_rate`, then cosine decay to the end value.

  Args:
    optim_config: the `optim` group (learning_rate, warmup_init_learning_rate,
      warmup_steps, end_learning_rate).
    total_steps: optimizer updates of the whole run; the decay ends there.

  Returns:
    An optax schedule: update count (int) -> learning rate (float32 scalar).
  """
  if optim_config.warmup_steps >= total_steps:
    raise ValueError(
        f'optim.warmup_steps={optim_config.warmup_steps} must be below the run\'s '
        f'{total_steps} steps (train.num_epochs x steps per epoch, or train.max_steps).')
  return optax.warmup_cosine_decay_schedule(
      init_value=optim_config.warmup_init_learning_rate,
      peak_value=optim_config.learning_rate,
      warmup_steps=optim_config.warmup_steps,
      decay_steps=total_steps,  # Counts the warm-up too.
      end_value=optim_config.end_learning_rate)


def global_norm(tree: PyTree) -> jax.Array:
  """The L2 norm of all of `tree`'s leaves together, a float32 scalar.

  The leaves are laid end to end and reduced once. optax.tree.norm reduces each leaf on
  its own: on a GPU that is a small kernel or two per leaf (286 of the 2,009 kernels of
  the study model's batch-256 step, compiled for an H200), each costing a few
  microseconds whatever its size. XLA makes this form two kernels.
  """
  leaves = [jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)]
  return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate(leaves))))


def in_row_major_layout(tree: PyTree) -> PyTree:
  """`tree`'s arrays pinned to the row-major layout the train state is stored in.

  For the gradients: cuDNN gives each conv kernel's gradient in its filter layout
  (O, H, W, I). Left free, XLA runs that kernel's whole update in the gradient's layout,
  transposing the params, both Adam moments and the EMA to it and back, in two kernels
  with copies between them. Pinned, the gradient is transposed once and each leaf's
  update is one kernel (study step compiled for an H100: 1,621 -> 1,464 kernels).
  """
  return jax.tree.map(
      lambda x: jax_layout.with_layout_constraint(x, jax_layout.Layout(tuple(range(x.ndim)))),
      tree)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm with the norm taken by `global_norm`: updates scaled by
  max_norm / norm when norm >= max_norm, else unchanged. Same (empty) state, so
  checkpoints are interchangeable with optax's."""

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates)
    keep = norm < max_norm
    updates = jax.tree.map(
        lambda u: jax.lax.select(keep, u, (u / norm.astype(u.dtype)) * max_norm), updates)
    return updates, state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def create_optimizer(optim_config: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW driven by `learning_rate_fn`."""
  return optax.chain(
      clip_by_global_norm(optim_config.grad_clip_norm),
      optax.adamw(learning_rate_fn, b1=optim_config.b1, b2=optim_config.b2,
                  eps=optim_config.eps, weight_decay=optim_config.weight_decay))


def ema_decay(update_count: jax.Array, *, beta: float, update_every: int,
              update_after_step: int, inv_gamma: float, power: float,
              min_value: float) -> jax.Array:
  """The ema-pytorch 0.4.2 decay applied after the `update_count`-th update.

  ema-pytorch's `EMA.update()` runs after every optimizer step with its counter k
  (0, 1, 2, ... = updates done before this one). It acts only when k % update_every
  == 0; it copies the weights while k <= update_after_step and once more at its first
  action after that (the `initted` copy, after which its lerp changes nothing); later
  it lerps with decay clip(1 - (1 + e / inv_gamma)^-power, min_value, beta), where
  e = (k + 1) - update_after_step - 1 because it reads the counter after incrementing.

  Args:
    update_count: int scalar k >= 0.
    beta, update_every, update_after_step, inv_gamma, power, min_value: as in
      ema_pytorch.EMA (config group `optim`, prefix `ema_`).

  Returns:
    float32 scalar decay in [0, 1]: 1 leaves the EMA as it is, 0 copies the weights,
    anything else is new = ema + (1 - decay) * (params - ema).
  """
  k = jnp.asarray(update_count, jnp.int32)
  first_lerp_step = (update_after_step // update_every + 1) * update_every
  epoch = jnp.maximum(k - update_after_step, 0).astype(jnp.float32)
  warm = 1.0 - (1.0 + epoch / inv_gamma) ** -power
  decay = jnp.clip(warm, min_value, beta)
  decay = jnp.where(k <= first_lerp_step, 0.0, decay)
  return jnp.where(k % update_every == 0, decay, 1.0).astype(jnp.float32)


def update_ema(ema_params: PyTree, params: PyTree, decay: jax.Array) -> PyTree:
  """Moves `ema_params` toward `params` by (1 - decay); decay 0 copies exactly."""
  weight = 1.0 - decay

  def lerp(ema, new):
    # torch.lerp's two-sided form, so a copy (weight 1) is exact and decay 1 is a no-op.
    moved = jnp.where(weight < 0.5, ema + weight * (new - ema),
                      new - (new - ema) * (1.0 - weight))
    return moved.astype(ema.dtype)

  return jax.tree.map(lerp, ema_params, params)


def _ema_kwargs(optim_config: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(beta=optim_config.ema_decay, update_every=optim_config.ema_update_every,
              update_after_step=optim_config.ema_update_after_step,
              inv_gamma=optim_config.ema_inv_gamma, power=optim_config.ema_power,
              min_value=optim_config.ema_min_value)


def create_train_state(config: ml_collections.ConfigDict, model: flax.linen.Module,
                       tx: optax.GradientTransformation, rng: jax.Array,
                       image_shape: tuple[int, int, int]) -> TrainState:
  """Initializes params (float32), a copy as EMA, the optimizer state and the step rng.

  Args:
    config: the full config (uses nothing but what `model` needs: shapes come in).
    model: the U-Net; `model.init(rng, x [1,H,W,C], t int32 [1])`.
    tx: the optimizer.
    rng: uint32 [2] key; split into init and step-noise keys.
    image_shape: (H, W, C) of one image.

  Returns:
    TrainState at step 0. Call under `jax.jit(..., out_shardings=...)` or
    `jax.eval_shape` to get shapes without allocating.
  """
  del config  # Kept in the signature so callers need not know what init reads.
  init_rng, step_rng = jax.random.split(rng)
  x = jnp.zeros((1, *image_shape), jnp.float32)
  t = jnp.zeros((1,), jnp.int32)
  params = model.init(init_rng, x, t)['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params), rng=step_rng)


def make_train_step(config: ml_collections.ConfigDict, model: flax.linen.Module,
                    tx: optax.GradientTransformation, schedule: Any,
                    learning_rate_fn: optax.Schedule | None = None,
                    ) -> Callable[[TrainState, dict[str, jax.Array]],
                                  tuple[TrainState, dict[str, jax.Array]]]:
  """Builds the pure step `train_step(state, batch) -> (state, metrics)`.

  Args:
    config: full config; reads `diffusion`, `optim` (EMA) and `train.grad_accum_steps`.
    model: the U-Net (its `dtype` is the compute dtype; params stay float32).
    tx: the optimizer from `create_optimizer`.
    schedule: a `schedules.Schedule` (float64 numpy); cast to float32 once here.
    learning_rate_fn: only for the logged `learning_rate` metric.

  Returns:
    train_step. `batch['image']` is float32 [B, H, W, C] in [-1, 1], B divisible by
    train.grad_accum_steps. metrics: float32 scalars loss (mean over the batch),
    grad_norm (before clipping) and learning_rate (used by this update).
  """
  dconf = config.diffusion
  schedule = schedules.schedule_as(schedule, jnp.float32)
  accum = config.train.grad_accum_steps
  ema_kwargs = _ema_kwargs(config.optim)
  loss_kwargs = dict(
      objective=dconf.objective,
      min_snr_gamma=dconf.min_snr_gamma if dconf.min_snr_gamma > 0 else None,
      offset_noise_strength=dconf.offset_noise_strength,
      input_scale=dconf.input_scale)

  def loss_fn(params, images, rng):
    def denoise_fn(x_t, t):
      # The model computes in its dtype; the loss is taken in float32.
      return model.apply({'params': params}, x_t, t).astype(jnp.float32)
    return diffusion.training_loss(denoise_fn, schedule, images, rng, **loss_kwargs)

  grad_fn = jax.value_and_grad(loss_fn)

  def loss_and_grads(params, images, rng):
    if accum == 1:
      return grad_fn(params, images, rng)
    # Micro-batch a takes rows a, a + accum, ...: each device keeps its own rows.
    micro = images.reshape(images.shape[0] // accum, accum, *images.shape[1:])
    micro = jnp.moveaxis(micro, 1, 0)

    def body(carry, xs):
      index, micro_images = xs
      loss, grads = grad_fn(params, micro_images, jax.random.fold_in(rng, index))
      total_loss, total_grads = carry
      return (total_loss + loss, jax.tree.map(jnp.add, total_grads, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
    return loss / accum, jax.tree.map(lambda g: g / accum, grads)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    images = batch['image'].astype(jnp.float32)
    loss, grads = loss_and_grads(state.params, images, rng)
    grads = in_row_major_layout(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, **ema_kwargs)
    ema_params = update_ema(state.ema_params, params, decay)
    metrics = {'loss': loss, 'grad_norm': global_norm(grads)}
    if learning_rate_fn is not None:
      metrics['learning_rate'] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
    new_state = state.replace(step=state.step + 1, params=params,
                              ema_params=ema_params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def compile_train_step(train_step: Callable, mesh: jax.sharding.Mesh,
                       state_sharding: PyTree, batch_sharding: PyTree) -> Callable:
  """jits `train_step` with the state donated and given in/out shardings.

  Args:
    train_step: from `make_train_step`.
    mesh: the device mesh (metrics come back replicated on it).
    state_sharding: a sharding pytree matching TrainState (replicated here).
    batch_sharding: sharding pytree of the batch dict (split on 'data').

  Returns:
    The jitted step; the old state's buffers are reused for the new one.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(with_mesh(train_step, mesh), donate_argnums=(0,),
                 in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated))


def with_mesh(fn: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """fn traced with `mesh` as the context mesh, so layers that must split the batch
  themselves (the fused linear attention's kernels, which XLA cannot partition) see
  how it is split."""
  @functools.wraps(fn)
  def traced_under_mesh(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return traced_under_mesh


def replicated_sharding(mesh: jax.sharding.Mesh, tree: PyTree) -> PyTree:
  """A NamedSharding pytree that replicates every leaf of `tree` over `mesh`."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda _: replicated, tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> dict[str, jax.sharding.NamedSharding]:
  """Sharding of a batch dict: the leading (example) axis split over 'data'."""
  return {'image': jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))}


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over all (or the given) devices, in Auto axis mode.

  Explicit mode (the default of `jax.make_mesh` in new JAX) breaks gathers from the
  replicated schedule tables; Auto lets XLA place them.
  """
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ('data',),
                           axis_types=(jax.sharding.AxisType.Auto,))


def model_dtype(name: str) -> jnp.dtype:
  """Compute dtype named by `model.dtype` (float32 or bfloat16)."""
  return jnp.dtype(name)


def create_schedule(diffusion_config: ml_collections.ConfigDict) -> schedules.Schedule:
  """The float64 `Schedule` named by `diffusion.schedule`, with its parameters.

  `custom` reads its betas ([timesteps] float64) from the .npy file `diffusion.betas_file`.
  """
  if diffusion_config.schedule == schedules.CUSTOM_SCHEDULE:
    betas = np.load(diffusion_config.betas_file)
    if betas.shape != (diffusion_config.timesteps,):
      raise ValueError(f'diffusion.betas_file={diffusion_config.betas_file!r} holds betas '
                       f'of shape {betas.shape}, not [diffusion.timesteps='
                       f'{diffusion_config.timesteps}].')
    return schedules.schedule_from_betas(betas)
  params = {
      'linear': {},
      'cosine': {'s': diffusion_config.cosine_s},
      'sigmoid': {'start': diffusion_config.sigmoid_start,
                  'end': diffusion_config.sigmoid_end,
                  'tau': diffusion_config.sigmoid_tau},
  }.get(diffusion_config.schedule, {})
  return schedules.make_schedule(diffusion_config.schedule, diffusion_config.timesteps,
                                 **params)


def attention_impl(name: str, dtype_name: str, backend: str | None = None) -> str:
  """`model.attention_impl` resolved: 'auto' -> 'cudnn' (fused flash attention) for
  bfloat16 on a GPU, else 'einsum'; 'einsum' and 'cudnn' pass through."""
  if name != 'auto':
    return name
  backend = backend or jax.default_backend()
  return 'cudnn' if backend == 'gpu' and dtype_name == 'bfloat16' else 'einsum'


# NVIDIA compute capabilities whose shared memory the fused linear attention's blocks were
# compiled against (bench/gpu_compile.py: the A100, 8.0; the H100 and H200, 9.0). Cards
# with less per block, such as consumer GPUs (8.6, 8.9), keep XLA's version under 'auto'.
FUSED_LINEAR_ATTENTION_CARDS = ('8.0', '9.0')


def linear_attention_impl(name: str, dtype_name: str, backend: str | None = None,
                          compute_capability: str | None = None) -> str:
  """`model.linear_attention_impl` resolved: 'auto' -> 'triton' (the fused kernels) for
  bfloat16 on an NVIDIA GPU of FUSED_LINEAR_ATTENTION_CARDS, else 'xla'; the others pass
  through. compute_capability ('9.0') defaults to the first GPU's.

  On an H200 at batch 256 the kernels ran the train step in 142.0 ms with a 28.8 GiB
  peak; XLA's version took 150.7 ms and 40.4 GiB at an earlier commit (bench/RESULTS.md).
  float32 keeps XLA's version, whose numbers the tests hold to PyTorch's.
  """
  if name != 'auto':
    return name
  backend = backend or jax.default_backend()
  if backend != 'gpu' or dtype_name != 'bfloat16':
    return 'xla'
  if compute_capability is None:
    # Absent on non-NVIDIA GPUs.
    compute_capability = getattr(jax.local_devices(backend='gpu')[0], 'compute_capability',
                                 None)
  return 'triton' if compute_capability in FUSED_LINEAR_ATTENTION_CARDS else 'xla'


def create_model(model_config: ml_collections.ConfigDict) -> flax.linen.Module:
  """The U-Net named by the `model` config group, with its typed arguments."""
  return unet.UNet(
      dim=model_config.dim, dim_mults=tuple(model_config.dim_mults),
      channels=model_config.channels,
      resnet_block_groups=model_config.resnet_block_groups,
      attn_heads=model_config.attn_heads, attn_dim_head=model_config.attn_dim_head,
      full_attn=tuple(model_config.full_attn) or None,
      self_condition=model_config.self_condition,
      attention_impl=attention_impl(model_config.attention_impl, model_config.dtype),
      # Absent from config files written before it existed (see config_check).
      linear_attention_impl=linear_attention_impl(
          model_config.get('linear_attention_impl', 'auto'), model_config.dtype),
      dtype=model_dtype(model_config.dtype))

