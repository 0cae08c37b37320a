"""Data: tfds builders (``builders``), prompt templates (``templates``), the record schema and
its checks (``records``), the data config (``config``) and the input pipeline (``pipeline``)."""

from visionr1_jax.data.config import data_config, eval_config, validate_data_config

__all__ = ["data_config", "eval_config", "validate_data_config"]
