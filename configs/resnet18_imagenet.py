"""FGC on ImageNet (ILSVRC-2012) with a gated ResNet-18, standard 224-px recipe.

  python -m fgc_jax.main --config=configs/resnet18_imagenet.py --workdir=gs://BUCKET/fgc_r18 \
      --config.data.manual_dir=/path/to/imagenet_tars

The spec fixes the method, not the ImageNet schedule; the choices here are documented
ones: global batch 1024 with the linear lr rule (0.1 per 256), weight decay 1e-4, 120
epochs split into a 40-epoch BAS stage and an 80-epoch FGC stage, step lr decay.
"""
import ml_collections

from configs import resnet20_cifar


def get_config() -> ml_collections.ConfigDict:
    config = resnet20_cifar.get_config()
    config.dataset = "imagenet2012"
    config.data.source = "tfds"
    config.data.image_size = 224  # random-resized crop for training; resize 256 + centre crop for eval
    config.data.prefetch = 4

    config.model.arch = "imagenet_resnet"
    config.model.depth = 18

    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.num_epochs = 120
    config.optimizer.learning_rate = 0.4  # 0.1 x batch / 256
    config.optimizer.weight_decay = 1e-4
    config.optimizer.lr_milestones = (60, 90, 110)

    config.bas.epochs = 40
    config.sparsity.ramp_epochs = 40
    config.fgc.warmup_epochs = 5
    config.fgc.bank_dtype = "float32"  # 1.28M rows x 512 x 2 banks x 2 blocks; 'bfloat16' halves it

    config.checkpoint_every_steps = 2000
    config.log_every_steps = 100
    config.eval_every_epochs = 5
    return config
