"""The errors the pipeline reports as one line, without a traceback.

Anything else that escapes a stage is a bug in the pipeline and keeps its traceback.
"""


class PipelineError(Exception):
    """A problem with the input or the machine that the user can act on."""


class ConfigError(PipelineError):
    """A config file under configs/ is wrong; nothing has run yet."""


class CheckpointError(PipelineError):
    """A checkpoint cannot be read, or is not a WavTokenizer checkpoint."""


class ConversionError(PipelineError):
    """A checkpoint was read, but its tensors do not fit the decoder's layout."""


class OutputError(PipelineError):
    """An output folder cannot be written safely."""
