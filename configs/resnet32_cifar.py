"""FGC on CIFAR-10 with a gated ResNet-32; otherwise the reference defaults (resnet20_cifar.py).

    python -m fgc_jax.main --config=configs/resnet32_cifar.py --workdir=/tmp/fgc_r32
"""
import ml_collections

from configs import resnet20_cifar


def get_config() -> ml_collections.ConfigDict:
    config = resnet20_cifar.get_config()
    config.model.depth = 32
    return config
