"""FGC on ImageNet with a gated ResNet-34; otherwise as resnet18_imagenet.py.

  python -m fgc_jax.main --config=configs/resnet34_imagenet.py --workdir=gs://BUCKET/fgc_r34
"""
import ml_collections

from configs import resnet18_imagenet


def get_config() -> ml_collections.ConfigDict:
    config = resnet18_imagenet.get_config()
    config.model.depth = 34
    return config
