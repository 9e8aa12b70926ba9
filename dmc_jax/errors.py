"""The errors a user of dmc_jax can fix. Every message is one line naming the file, tensor, key or argument and
what was expected; the command lines print it and exit with status 2. Anything else raised is a bug."""


class UserError(ValueError):
  """Base of every error a user can fix (catch this one)."""


class ConfigError(UserError):
  """A configuration value or key is invalid."""


class ConversionError(UserError):
  """Bad checkpoint input to a converter (file, tensor table, shapes, dtypes)."""


class TokenizerError(UserError):
  """A tokenizer file or its special ids are unusable."""


class CheckpointError(UserError):
  """A checkpoint directory is missing, malformed, corrupted or refused."""


class DataError(UserError):
  """Text data sources: missing files, malformed lines, missing fields."""


class CachePoolExhausted(UserError):
  """The compressed cache's page pool ran out (writes were dropped, never misplaced)."""


class ArgumentError(UserError):
  """An argument of the Python API or the command line is out of range."""


class RequestRejected(UserError):
  """A serving request that can never be served (its prompt and output cannot fit the cache); names the limit."""
