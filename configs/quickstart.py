"""A five-minute, fully offline FGC run: gated ResNet-20 on scikit-learn's bundled 8x8 digits.

  python -m fgc_jax.main --config=configs/quickstart.py --workdir=/tmp/fgc_quickstart

Passes through every stage of the method (BAS, FGC instance warm-up, FGC with k-NN
positives, evaluation with dynamic MACs) on 2 CPU cores. The data ships with
scikit-learn, so nothing is downloaded.
"""
import ml_collections

from configs import resnet20_cifar


def get_config() -> ml_collections.ConfigDict:
    config = resnet20_cifar.get_config()
    config.dataset = "digits"
    config.data.source = "sklearn"
    config.data.image_size = 8

    config.batch_size = 128
    config.eval_batch_size = 360
    config.num_epochs = 12  # 12 steps an epoch (1,437 examples: 11 full batches and one of 29)
    config.optimizer.learning_rate = 0.1
    config.optimizer.lr_milestones = (9,)

    config.bas.epochs = 4
    config.sparsity.ramp_epochs = 4
    config.sparsity.rho_max = 0.4
    config.fgc.warmup_epochs = 2
    config.fgc.k = 20
    config.fgc.kappa = 0.1  # larger than the reference so the short run feels the loss

    config.checkpoint_every_steps = 50
    config.log_every_steps = 10
    config.eval_every_epochs = 4
    return config
