"""FGC on CIFAR-10 with a gated ResNet-20: the reference defaults of FGC_SPEC.md §2-§3.

    python -m fgc_jax.main --config=configs/resnet20_cifar.py --workdir=/tmp/fgc_r20
Switch to CIFAR-100 with `--config.dataset=cifar100`. The first run downloads and checks the
dataset's binary archive (into ~/.cache/fgc_jax/datasets); read a local copy instead with
`--config.data.dir=/path/to/cifar-10-batches-bin`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # initialisation, gate noise and data order all derive from it

    # Data.
    config.dataset = "cifar10"  # 'cifar10' | 'cifar100' | 'imagenet2012' | 'digits'
    config.data = ml_collections.ConfigDict()
    # 'cifar_bin' (the CIFAR binary archives, downloaded on first use; no TensorFlow needed)
    # | 'tfds' (array_record files built beforehand by `tfds build`) | 'sklearn' (digits)
    config.data.source = "cifar_bin"
    # cifar_bin: the directory holding cifar-10-batches-bin/ (or those files), where a missing
    # archive is downloaded ('' = $XDG_CACHE_HOME/fgc_jax/datasets, else ~/.cache/fgc_jax/datasets);
    # tfds: its data_dir ('' = the tfds default)
    config.data.dir = ""
    # cifar_bin's archive when data.dir lacks the files: '' = the dataset authors' own
    # (https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, or cifar-100-binary.tar.gz);
    # a mirror's URL of that file keeps the official checks (size, published MD5, SHA-256)
    config.data.download_url = ""
    # The SHA-256 the downloaded archive must have instead ('' = the official archive's checks),
    # for an archive packed elsewhere; 64 hex digits
    config.data.download_sha256 = ""
    config.data.manual_dir = ""  # tfds manual_dir (ImageNet only)
    config.data.image_size = 32  # model input side; CIFAR images are used as they are
    config.data.prefetch = 2  # batches prepared ahead of the train step in a background thread

    # Model (FGC_SPEC §1).
    config.model = ml_collections.ConfigDict()
    config.model.arch = "cifar_resnet"  # 'cifar_resnet' (option-A shortcut) | 'imagenet_resnet'
    config.model.depth = 20  # 20/32/44/56/110 for cifar_resnet, 18/34 for imagenet_resnet
    config.model.gated = True  # False builds the dense (ungated) baseline
    config.model.gate_hidden = 16  # width of the gate network's hidden layer
    config.model.tau = 2.0 / 3.0  # Gumbel-sigmoid temperature of the straight-through gates
    config.compute_dtype = "float32"  # 'float32' | 'bfloat16' (activations; params stay fp32)
    config.sync_batch_norm = True  # BatchNorm statistics over the global batch (all devices)
    # Precision of float32 matrix products and convolutions (jax.default_matmul_precision):
    # 'highest' = float32 on every backend, as the reference; 'default' lets XLA use TF32
    # (NVIDIA Ampere+) or bfloat16 passes (TPU): faster, but beyond the reference's float32 error.
    config.matmul_precision = "highest"

    # Optimisation (FGC_SPEC §3).
    config.batch_size = 256  # global training batch, split over all devices
    config.eval_batch_size = 1000  # global evaluation batch (the last one is padded and masked)
    config.num_epochs = 500  # BAS stage plus FGC stage
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 0.1  # initial learning rate
    config.optimizer.momentum = 0.9  # Nesterov momentum
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-4  # L2 on backbone parameters only (never the gate networks)
    config.optimizer.lr_milestones = (300, 375, 450)  # epochs at which the lr is multiplied by lr_decay
    config.optimizer.lr_decay = 0.1

    # Stage 1, BAS: batch-shaping loss with weight zeta(e) = zeta * (epochs - e) / epochs.
    config.bas = ml_collections.ConfigDict()
    config.bas.epochs = 100  # length of the BAS stage; the FGC stage starts after it
    config.bas.zeta = 0.75  # initial batch-shaping weight
    config.bas.alpha = 0.6  # Beta prior of the batch-shaping loss
    config.bas.beta = 0.4

    # Stage 2, FGC: L0 weight rho ramps 0 -> rho_max over ramp_epochs from the stage start.
    config.sparsity = ml_collections.ConfigDict()
    config.sparsity.rho_max = 0.4
    config.sparsity.ramp_epochs = 200

    config.fgc = ml_collections.ConfigDict()
    config.fgc.kappa = 0.003  # weight of the contrastive loss; 0 gives the BAS-only baseline
    config.fgc.blocks = (-2, -1)  # gated blocks with banks and the loss (negative: from the end)
    config.fgc.k = 200  # nearest neighbours in feature space that are positives
    config.fgc.temperature = 0.07  # softmax temperature over the gate bank
    config.fgc.momentum = 0.5  # memory-bank momentum
    config.fgc.warmup_epochs = 20  # FGC epochs with instance positives only, before neighbours
    config.fgc.bank_dtype = "float32"  # 'float32' | 'bfloat16' bank storage
    config.fgc.knn_method = "exact"  # 'exact' (lax.top_k) | 'approx' (lax.approx_max_k, fast on TPU only)

    # Start the FGC stage from a BAS-stage checkpoint: an orbax checkpoint directory of ours
    # or a PyTorch .pth of the reference; training then begins at epoch bas.epochs.
    config.init_from = ""
    # A PyTorch .pth is a pickle, which can name code to run on opening. False (keep it so):
    # a .pth (init_from, or evaluate's --torch_checkpoint) naming anything beyond tensors,
    # numbers, strings, containers and argparse.Namespace is refused before anything runs.
    # True, for a file whose source you trust: it is unpickled in full, running that code,
    # and a warning says so.
    config.trust_pickled_code = False

    # Checkpoints, logging, evaluation.
    config.checkpoint_every_steps = 1000  # besides the end of every epoch
    config.keep_checkpoints = 3  # most recent checkpoints kept (the best one is kept as well)
    # On resume, a checkpoint that fails its integrity check (fingerprints, NaN/inf, unreadable):
    # True = move it to WORKDIR/quarantine/ and resume from the newest one that passes (for
    # unattended jobs; an ERROR line names it); False = stop, leaving it in place.
    config.checkpoint_fallback = True
    config.log_every_steps = 50
    config.eval_every_epochs = 5  # and at the end of the run
    # (start, stop): write a jax.profiler trace of steps start+1..stop of the run to
    # WORKDIR/profile/ (TensorBoard's profile plugin or Perfetto read it); () = no profile.
    config.profile_steps = ()
    return config
