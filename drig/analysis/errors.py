"""The analysis job's errors, shared by every module of drig.analysis."""


class AnalysisError(ValueError):
  """The analysis cannot run with this config, model or workdir; says why."""


class ConfigMismatchError(AnalysisError):
  """The workdir holds results of another config."""
