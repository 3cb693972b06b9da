"""Base configuration: every number of a run lives here; the study's settings.

The study: SEN12MS summer RGB at 128x128, T = 500, U-Net dim=64, dim_mults=(1, 2, 4)
(9,908,483 params), batch 8, AdamW lr 2e-5 with linear warm-up then cosine decay to 0,
gradient clipping at norm 1, EMA 0.995 on the ema-pytorch schedule, bfloat16 compute
with float32 params and loss, objective pred_noise, 11 epochs (45,753 patches -> 5,719
steps an epoch), a checkpoint and a 5x5 EMA sample grid after every epoch.

The study's configs (linear.py, cosine.py, sigmoid.py) import this file and change only
what differs; demo.py shrinks it to run on a laptop CPU. Override any field from the
command line, e.g. `--config.train.batch_size=16`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # One seed drives init, noise and data order.
  config.seed = 0

  # --- data: SEN12MS summer RGB through TFDS (array_record) and grain.
  config.data = data = ml_collections.ConfigDict()
  data.dataset = 'sen12ms/summer_rgb'
  data.data_dir = 'data/tfds'  # Where the built TFDS dataset lives.
  data.manual_dir = ''  # Raw SEN12MS tree/archive; only needed to build the dataset.
  data.split = 'train+test'  # The study trained on every summer patch.
  data.image_size = 128  # Output side length in pixels, after the resize.
  data.dn_scale = 5000.0  # Digital numbers divided by this, then clipped to [0, 1].
  data.gamma = 2.2  # Brightness gamma: x ** (1 / gamma).
  data.random_flip = True  # Random horizontal flip.
  data.num_workers = 0  # grain worker processes (0: in the main process).
  data.prefetch = 2  # Batches put on the devices ahead of the step.
  # grain mapping threads per process: numpy releases the GIL in the gamma lookup and
  # resize (2 threads: 853 vs 468 images/s on 2 cores, bench/RESULTS.md).
  data.read_threads = 2
  data.read_buffer_size = 2  # Batches buffered per process (grain's default 500 is GBs).

  # --- model: the denoising-diffusion-pytorch 1.10.12 Unet.
  config.model = model = ml_collections.ConfigDict()
  model.dim = 64
  model.dim_mults = (1, 2, 4)
  model.channels = 3
  model.resnet_block_groups = 8
  model.attn_heads = 4
  model.attn_dim_head = 32
  model.full_attn = ()  # Per stage; empty means full attention in the innermost only.
  model.self_condition = False
  model.dtype = 'bfloat16'  # Compute dtype; params stay float32.
  # Full attention's kernel: einsum (exact, any backend), cudnn (fused flash attention,
  # NVIDIA GPU + bfloat16; needed for large batches), auto (cudnn where it applies).
  model.attention_impl = 'auto'
  # Linear attention's kernels: xla (any backend); triton (fused Pallas kernels on
  # NVIDIA GPUs, for layers of up to 128 channels, XLA for wider ones: on an H200 at
  # batch 256, ~29% less memory and a faster step); auto (triton for bfloat16 on an
  # A100, H100 or H200, whose shared memory the kernels were compiled for; else xla);
  # triton_interpret (the kernels interpreted, any backend; slow, for checks).
  model.linear_attention_impl = 'auto'

  # --- diffusion: schedule, objective and loss.
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = 'sigmoid'  # One of linear, cosine, sigmoid, custom.
  diffusion.betas_file = ''  # custom only: .npy of the [timesteps] betas (float64).
  diffusion.timesteps = 500
  diffusion.cosine_s = 0.008
  diffusion.sigmoid_start = -3.0
  diffusion.sigmoid_end = 3.0
  diffusion.sigmoid_tau = 1.0
  diffusion.objective = 'pred_noise'  # One of pred_noise, pred_x0, pred_v.
  diffusion.min_snr_gamma = 0.0  # > 0 turns on min-SNR loss weighting.
  diffusion.offset_noise_strength = 0.0
  diffusion.input_scale = 1.0  # Chen (2023) input scaling b: x0 -> b * x0.

  # --- optim: AdamW, warm-up then cosine decay to 0, clipping, EMA (ema-pytorch).
  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 2e-5  # Peak, reached at the end of the warm-up.
  optim.warmup_init_learning_rate = 0.0  # Linear warm-up starts here.
  optim.warmup_steps = 500
  optim.end_learning_rate = 0.0  # Cosine decay ends here at the last step.
  optim.b1 = 0.9
  optim.b2 = 0.99  # denoising-diffusion-pytorch Trainer's adam_betas.
  optim.eps = 1e-8  # Adam's epsilon (torch and optax default).
  optim.weight_decay = 0.0
  optim.grad_clip_norm = 1.0
  optim.ema_decay = 0.995  # ema-pytorch beta: the cap of the warm-up schedule.
  optim.ema_update_every = 10
  optim.ema_update_after_step = 100  # Before this, EMA copies the weights.
  optim.ema_inv_gamma = 1.0
  optim.ema_power = 2.0 / 3.0
  optim.ema_min_value = 0.0

  # --- train: the loop.
  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 8  # Global batch over all devices and hosts.
  train.num_epochs = 11
  train.max_steps = -1  # > 0 stops early (e.g. tests); -1 runs all epochs.
  train.grad_accum_steps = 1  # Micro-batches per step, summed inside one jitted step.
  train.log_every_steps = 1
  train.checkpoint_every_steps = 1000  # Besides the checkpoint after every epoch.
  train.keep_checkpoints = 3  # Last K step checkpoints; epoch ones are kept too.
  train.keep_epoch_checkpoints = True
  train.num_grid_samples = 25  # 5x5 EMA sample grid after each epoch.
  # ddpm (all T steps), ddim or dpm_solver (DPM-Solver++(2M)): train.grid_ddim_steps steps.
  train.grid_sampler = 'ddpm'
  train.grid_ddim_steps = 50
  train.grid_clip_denoised = True
  train.progress_bar = True  # tqdm bar on the first host.
  train.distributed = False  # Call jax.distributed.initialize() (several hosts).
  # With distributed: the coordinator 'host:port', the number of processes and this
  # process's id. Empty/0/-1: detected from the cluster (SLURM, MPI, Cloud TPU, ...).
  train.coordinator_address = ''
  train.num_processes = 0
  train.process_id = -1
  # JAX CPU devices on a CPU-only host, each on its own core, the batch sharded over them
  # (XLA:CPU runs one small conv on one core). 0: one per core that divides the batch;
  # 1: JAX's default single device. Ignored when XLA_FLAGS sets the count.
  train.cpu_devices = 0
  # True: on a CPU-only host glibc malloc keeps freed memory (eo_ddpm_jax.host_memory), so
  # XLA:CPU reuses a large step's buffers instead of faulting in new pages: the bench's
  # step (dim 32, 64x64, batch 8) 10% faster, but the demo 1.3x slower end to end (one
  # malloc arena for all threads). Off by default; measure before turning it on.
  train.cpu_keep_freed_memory = False

  # --- sample: --mode=sample.
  config.sample = sample = ml_collections.ConfigDict()
  sample.num_samples = 25
  sample.batch_size = 25
  sample.sampler = 'ddpm'  # ddpm (all T steps), ddim or dpm_solver.
  sample.ddim_steps = 50  # Steps of ddim and dpm_solver.
  sample.ddim_eta = 0.0
  sample.checkpoint_step = -1  # -1: the latest.
  sample.clip_denoised = True
  sample.seed_offset = 1  # Sampling rng = fold_in(PRNGKey(seed), seed_offset).
  sample.progress_bar = True

  # --- eval: --mode=evaluate, metrics of the EMA samples of saved checkpoints.
  config.eval = ev = ml_collections.ConfigDict()
  ev.checkpoint_steps = ()  # Steps to evaluate; empty: every epoch-end checkpoint.
  ev.num_samples = 5000  # Generated images per checkpoint.
  ev.batch_size = 250  # Images per sampler call, over all devices (rounded up to them).
  # DPM-Solver++(2M) takes 25 denoiser calls where DDPM takes T = 500, so every epoch
  # can be scored; set ddpm to score the study's own sampler.
  ev.sampler = 'dpm_solver'  # ddpm (all T steps), ddim or dpm_solver.
  ev.steps = 25  # Steps of ddim and dpm_solver.
  ev.ddim_eta = 0.0
  ev.clip_denoised = True
  ev.seed_offset = 2  # Sampling rng = fold_in(PRNGKey(seed), seed_offset), every step.
  ev.split = 'train+test'  # TFDS split of the real patches (not flipped).
  ev.num_real = 5000  # Real patches, a seeded random subset (at most the split's size).
  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or an .npz converted from it;
  # empty: FID and KID are skipped (null in eval.json).
  ev.inception_weights = ''
  # pytorch-fid's default; split over all devices, rounded up to a multiple of them.
  ev.inception_batch_size = 50
  ev.kid_num_subsets = 100  # KID: subsets and their size (torch-fidelity's defaults).
  ev.kid_subset_size = 1000
  ev.num_grid_samples = 25  # The first samples, saved as samples/eval_samples_<step>.png.
  ev.save_samples = False  # Also write every sample and real patch as .npy (large).
  ev.progress_bar = True

  # --- report: --mode=report over several run directories.
  config.report = report = ml_collections.ConfigDict()
  report.loss_smoothing = 0.6  # TensorBoard's default weight of its debiased EMA.
  report.raw_loss_alpha = 0.25  # Opacity of the raw loss drawn under the smoothed one.
  report.num_real_grid = 25  # Real patches in the grid beside the samples.
  report.dpi = 120  # Resolution of the PNG figures.
  return config
