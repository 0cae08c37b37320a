"""tfds builders; importing this package registers them with tfds.

``python -m visionr1_jax.data.tfds_cli build <name> --imports visionr1_jax.data.builders`` is
the ``tfds build`` command made usable without TensorFlow. ``coco_format`` (the user's own
COCO-format files, ``user_coco``) is built from a run config instead:
``python -m visionr1_jax.data.tfds_cli prepare --config=...``.
"""

from visionr1_jax.data.builders.coco_detection import CocoDetection
from visionr1_jax.data.builders.odinw import Odinw
from visionr1_jax.data.builders.refcoco import Refcoco
from visionr1_jax.data.builders.synthetic_shapes import SyntheticShapes
from visionr1_jax.data.builders.user_coco import CocoFormat
from visionr1_jax.data.builders.vision_r1_data import VisionR1Data

__all__ = ["CocoDetection", "CocoFormat", "Odinw", "Refcoco", "SyntheticShapes", "VisionR1Data"]
