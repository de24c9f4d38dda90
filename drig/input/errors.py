"""The error of the input pipeline: a setting that cannot give valid batches."""


class InputPipelineError(ValueError):
  """A batch size, class proportion, host layout or option that cannot work."""
