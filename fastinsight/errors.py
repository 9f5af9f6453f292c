"""One error family for everything a user can get wrong.

Every message says what was expected, what was found, and what to do. The CLI turns these into a
one-line message and a non-zero exit code (``exit_code``), never a traceback.
"""

from __future__ import annotations


class FastInsightError(Exception):
    """Base class of every error fastinsight raises on bad input or a bad environment.

    ``fields`` names the option fields a message is about (``("batch_size",)``): the library
    speaks in field names, and the CLI rewrites them as its flags (``--batch-size``).
    """

    exit_code = 2

    def __init__(self, *args: object, fields: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.fields = fields


class ConfigError(FastInsightError):
    """A configuration object built with invalid fields (from Python or from the CLI).

    Messages name the field (``batch_size must be >= 1``); the CLI maps field names to its flags.
    A bad configuration *inside a model file* stays a ``CheckpointError``.
    """

    exit_code = 2


class CheckpointError(FastInsightError):
    """A model file that is missing, unreadable, or of another architecture."""

    exit_code = 3


class InputError(FastInsightError):
    """Tensors or feature files of the wrong shape, dtype or content (NaN, empty)."""

    exit_code = 4


class SlideError(FastInsightError):
    """A slide that cannot be opened, lacks an mpp, or has no tissue."""

    exit_code = 5


class OutputError(FastInsightError):
    """An output path that cannot be written."""

    exit_code = 6


class BackendError(FastInsightError):
    """A requested backend (Triton, CUDA, TensorRT, ONNX Runtime) that is not available here."""

    exit_code = 7


class ParityError(BackendError):
    """A compiled back-end (TensorRT engine, ONNX graph) whose outputs disagree with the reference.

    Not an output-path problem: the file was written, but the back-end computes something else.
    Same exit code as the other back-end failures (7).
    """
