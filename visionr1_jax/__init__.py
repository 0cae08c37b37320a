"""visionr1_jax: Vision-R1 GRPO for vision-language localisation in JAX/Flax.

Subpackages: ``rewards`` (parsing, IoU/matching kernels, Vision-R1 reward), ``models``
(Qwen2-VL / Qwen2.5-VL in Flax NNX), ``data`` (tfds builders and input pipeline).
"""

__version__ = "0.1.0"
