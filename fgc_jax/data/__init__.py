"""Data sources, and what fetches them: each source reads one kind of files into examples
addressed by a stable index.

`fgc_jax.input_pipeline` turns a source into batches (permutation, augmentation,
batching, prefetch, sharding); the modules here only find, check and read files:

  * `cifar`: the CIFAR-10/100 binary archives (`config.data.source='cifar_bin'`), fetched
    and verified on first use by `cifar_download`.
  * `tfds_source`: tfds array_record datasets (`'tfds'`), CIFAR and ImageNet.
  * `imagenet_folder`: extracted ImageNet in torchvision's ImageFolder layout
    (`'imagenet_folder'`), read directly, no preparation step.
  * `digits`: scikit-learn's bundled 8x8 digits (`'sklearn'`, offline quickstart).
"""
