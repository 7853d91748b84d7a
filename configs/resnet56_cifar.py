"""FGC on CIFAR-10 with a gated ResNet-56; otherwise the reference defaults (resnet20_cifar.py).

    python -m fgc_jax.main --config=configs/resnet56_cifar.py --workdir=/tmp/fgc_r56
"""
import ml_collections

from configs import resnet20_cifar


def get_config() -> ml_collections.ConfigDict:
    config = resnet20_cifar.get_config()
    config.model.depth = 56
    return config
