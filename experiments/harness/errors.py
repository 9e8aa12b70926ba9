"""The harness's own user errors (experiment configs, meshes, training state); one line, exit 2 at the CLI."""


class HarnessError(ValueError):
  """Base of the harness's user errors."""


class ExperimentConfigError(HarnessError):
  """An experiment config file, variant, key or value is invalid."""


class MeshError(HarnessError):
  """A device mesh does not fit the devices or the model."""


class TrainCheckpointError(HarnessError):
  """A training workdir's Orbax state is missing, corrupted or does not match the config."""


class AssetMissing(HarnessError, FileNotFoundError):
  """A bundled asset (the SmolLM2 GGUF) is not installed."""
