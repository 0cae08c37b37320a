"""What every builder shares: the record features, array_record output, a template config."""

from __future__ import annotations

import dataclasses
import inspect

import tensorflow_datasets as tfds
from etils import epath

from visionr1_jax.data import records


@dataclasses.dataclass(eq=False)
class RecordBuilderConfig(tfds.core.BuilderConfig):
    """Builder config fields common to all builders.

    Attributes:
      template: prompt template the ``prompt`` field is rendered in (``qwen25``/``griffon``).
    """

    template: str = "qwen25"


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tfds builder writing ``records.features()`` as array_record (readable without TF)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' default probes `importlib_resources` (not installed without TF extras).
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip().split("\n")[0],
            features=records.features(),
        )
