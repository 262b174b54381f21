"""The paper's configuration (Yao et al. 2018, Sec 3 and 4.2).

512x512 inputs, a 64x64 saliency map (Fig. 2), LSE-LBA pooling with the
sharpness prior r0 given as the config argument, Adam with learning rate 1e-3
and weight decay 1e-5, early stopping on the validation mean AUC.

  lsemil train --config configs/paper.py:r0=5 --workdir W --data-dir P

`r0=0`, `r0=5` and `r0=10` are the three runs of Tables 2 and 3. Meant for a
GPU or TPU; on a 2-core CPU one step at batch 16 takes tens of seconds.

Arguments (comma-separated): `r0=` the sharpness prior; `N=` the target saliency
resolution, the side of the map S (Fig. 1 trains one model per N in {8, 16, 32, 64}; the
side of some level of the up path); `seed=` the run's seed (init, data order, augmentation);
`dtype=` the compute dtype, float32 or bfloat16 (params and Adam moments stay float32):
the TPU scripts train with `dtype=bfloat16`, the MXU's native input type;
e.g. `configs/paper.py:r0=5,N=16,seed=1` (or by name, `paper:r0=5,N=16,seed=1`); a bare
value is r0 (`paper:5`). Parsed by `lsemil.core.configuration.parse_arg`.
"""

import ml_collections

from lsemil.core import configuration


def get_model_config() -> ml_collections.ConfigDict:
  """The paper-scale model (Sec 3, Fig. 2); `lsemil info` prints its size."""
  m = ml_collections.ConfigDict()
  # Which model: mil (lsemil.models.mil, this paper) | gap (lsemil.models.gap_classifier, the
  # post-hoc CAM / Grad-CAM baseline of configs/baseline_gap.py); lsemil.models.registry builds
  # either.
  m.arch = "mil"
  # Classes: NIH's 14 findings (lsemil.data.nih.CLASSES); training sets it from the source's
  # class list (data.classes), never by hand.
  m.num_classes = 14
  # Input side in pixels; images are (B, input_size, input_size, 1) in [0, 1].
  m.input_size = 512
  # Stem: one 7x7 conv with this stride; level 0 then has input_size/stem_stride pixels.
  m.stem_stride = 2
  m.stem_features = 32
  # Down path (Sec 3.1): channels per resolution level; level l has
  # input_size / stem_stride / 2**l pixels. Level 0 is the stem output refined by
  # residual blocks; each later level starts with a strided residual block.
  m.widths = (32, 64, 128, 256, 512, 512)
  # Resolution-preserving identity residual blocks per level (after the strided one).
  m.blocks_per_level = (1, 1, 1, 1, 1, 1)
  # Bottleneck factor inside residual blocks (g = 1x1 -> 3x3 -> 1x1).
  m.bottleneck_ratio = 4
  # Horizontal flow (Sec 3.2, Eq. 2): a DenseNet block on each fused level.
  m.dense_layers = 4
  m.dense_growth = 32
  # Up path (Sec 3.3, Eq. 3): refinement convs after each upsample-and-concat.
  m.up_features = 128
  m.up_convs = 2
  # Side N of the saliency map S (Sec 3.6); a power of two reached by some level.
  m.saliency_size = 64
  # Pooling (Sec 3.4/3.5): lse_lba | lse | generalized_mean | noisy_or | max | mean.
  m.pooling = "lse_lba"
  # Sharpness prior r0 of LSE-LBA (r = r0 + exp(beta)); also r for lse / generalized_mean.
  m.r0 = 5.0
  m.per_class_beta = True
  m.beta_init = 0.0
  # batch (BatchNorm with batch_stats) | group (GroupNorm).
  m.norm = "batch"
  m.group_norm_groups = 16
  # Compute dtype: float32 | bfloat16 (params stay float32).
  m.dtype = "float32"
  # Rematerialise residual / dense blocks to save accelerator memory.
  m.remat = False
  # What remat keeps for the backward pass: nothing (recompute each block) | dots (the conv
  # outputs; norms and relus are recomputed).
  m.remat_policy = "nothing"
  # Speed options (lsemil/models/layers.py): same parameters, same sums up to float rounding;
  # measured in README's benchmark section.
  # BatchNorm: fused (custom VJP saving only its input and float32 mean / inverse std)
  # | flax (nn.BatchNorm; its autodiff keeps float32 intermediates: 222 vs 123 MB/image
  # saved for the backward pass in bf16 at 512 px) | auto (fused on accelerators, flax on
  # CPU backends, where fused measured slower in float32).
  m.batch_norm_impl = "auto"
  # 1x1 convolutions: dot (a dot_general, strided ones subsample first) | conv.
  m.conv1x1_impl = "dot"
  # Weight gradients of k x k convs: xla (jax's conv transpose) | gemm (im2col + one dot)
  # | auto (gemm on CPU backends, xla elsewhere).
  m.conv_weight_grad = "xla"
  # The 7x7 strided stem on 1 channel: conv | space_to_depth (a 4x4 stride-1 conv on
  # 2x2 blocks, 4 channels) | pad8 (input channels zero-padded to 8, for tensor cores).
  m.stem_impl = "conv"
  # How the DenseNet blocks (Eq. 2) read the growing concatenation F_1 + ... + F_m: concat
  # (formed for each layer) | split (never formed: each conv is the sum of one conv per map,
  # kernel sliced) | buffer (the maps written into one preallocated tensor, DenseNet's
  # shared storage; convs zero over the channels not yet written) | auto (split on TPU,
  # where it saves HBM bytes per step, README "Before you rent a TPU"; concat elsewhere).
  m.dense_impl = "auto"
  # How the up path (Eq. 3) reads U(F^{l+1}) + F^l: concat (upsampled and concatenated at
  # the fine resolution) | split (never formed: the first conv split over its two inputs,
  # U(F^{l+1})'s share computed at the coarse resolution, layers.upsampled_input_kernel)
  # | auto (split on TPU, concat elsewhere).
  m.up_impl = "auto"
  return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  model = get_model_config()
  # The arguments' defaults are the model's own values: each default is written once.
  args = configuration.parse_arg(
    arg, r0=model.r0, N=model.saliency_size, seed=0, dtype=model.dtype
  )
  config = ml_collections.ConfigDict()
  config.name = "paper"
  config.seed = args.seed
  config.model = model
  config.model.r0 = args.r0
  config.model.saliency_size = args.N
  config.model.dtype = args.dtype

  config.data = ml_collections.ConfigDict()
  # A prepared folder (`lsemil prepare`, png or tfds) or a raw folder of data.source.
  config.data.data_dir = ""
  # The dataset's reader (lsemil.data.sources): nih | chexpert | mimic-cxr-jpg | vindr-cxr |
  # rsna-pneumonia | siim-acr | csv.
  config.data.source = "nih"
  # The source's class names in the model's output order; empty = from the source: training
  # writes them here and their number into model.num_classes (lsemil.data.findings).
  config.data.classes = ()
  # Label policies (lsemil.data.index.Options). An uncertain (-1) label: ignore (unknown, left
  # out of the loss and the AUC) | zeros | ones (U-Ignore / U-Zeros / U-Ones, Irvin et al.
  # 2019); a blank one: zeros | ignore; CheXpert and MIMIC-CXR views: frontal | all;
  # VinDr-CXR's readers: a finding is positive when any reader marks it | the majority does.
  config.data.uncertain = "ignore"
  config.data.blank = "zeros"
  config.data.views = "frontal"
  config.data.readers = "any"
  # > 0: with no data_dir, synthesize this many patients into WORKDIR/data first
  # (`lsemil synth`; the smoke config's self-contained run). 0 = a data_dir is required.
  config.data.synth_patients = 0
  # Validation = this patient-wise fraction of the official train_val list (Sec 4.1); the
  # seed draws it, and the whole patient-wise split of a source without an official one.
  config.data.val_fraction = 0.25
  config.data.split_seed = 0
  # Augmentation (Sec 4.2), one affine warp. Rotation in degrees, translation in
  # pixels of the 512x512 image. The paper's zoom "[0.25, 0.75]" is ambiguous:
  # read as a scale factor it would shrink every image to a quarter..three
  # quarters; read as +-25% it is (0.75, 1.25), our default. Set
  # `zoom_range=(0.25, 0.75)` for the literal reading.
  config.data.augment = True
  config.data.rotation_deg = 25.0
  config.data.translation_px = 50.0
  config.data.zoom_range = (0.75, 1.25)
  # Input pipeline: grain read threads per process (0 = 2 per core, at most 16) and
  # worker processes (0 = in-process; threads were fastest on 2 cores).
  config.data.read_threads = 0
  config.data.worker_count = 0
  config.data.prefetch_buffer_size = 2

  config.train = ml_collections.ConfigDict()
  # Global batch (all devices and hosts together).
  config.train.batch_size = 16
  config.train.eval_batch_size = 32
  # Adam (Sec 4.2).
  config.train.learning_rate = 1e-3
  config.train.weight_decay = 1e-5
  config.train.num_epochs = 30
  # 0 = run num_epochs epochs.
  config.train.num_steps = 0
  # Validation every N steps; 0 = every `eval_every_epochs` epochs. Early stopping
  # patience counts evaluations.
  config.train.eval_every_steps = 0
  config.train.eval_every_epochs = 1
  config.train.patience = 5
  config.train.log_every_steps = 50
  # Checkpoints: every N steps (0 = at each evaluation), keep the last k plus the best.
  config.train.checkpoint_every_steps = 0
  config.train.keep_checkpoints = 2
  # Shard large params over 'data' (FSDP style) instead of replicating them.
  config.train.fsdp = False
  config.train.fsdp_min_size = 2**18
  # Fine-tuning (`lsemil train --init-from`): start from another model (a workdir's best
  # checkpoint, a checkpoint step folder or a `lsemil export` folder), its backbone and the
  # head rows of the classes both models have (lsemil.training.initialization), when the
  # workdir has no checkpoint of its own; the optimizer starts fresh. '' = from scratch.
  config.train.init_from = ""
  # What trains: none (nothing frozen) | backbone (frozen, BatchNorm statistics too: only the
  # head, the saliency conv and LSE-LBA's beta, trains).
  config.train.freeze = "none"
  # Write checkpoints in the background (orbax async); False blocks at each save.
  config.train.async_checkpoints = True
  return config
