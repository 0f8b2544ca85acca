"""Errors the imaging pipeline reports about a series, and how other errors are classed (plain, no I/O)."""

from __future__ import annotations

# The only BaseExceptions that may end a pipeline worker. Every other one is caught where a
# series is processed: pyo3 (Rust) extensions such as the pylibjpeg-rle decoder raise
# pyo3_runtime.PanicException on malformed input, and it derives from BaseException, not Exception.
FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


class SeriesError(Exception):
    """A series the pipeline cannot process; `permanent` skips the retries.

    The reason is stored with the series, so it should say what is wrong in
    words an IT person can act on ("mixed image sizes: 256x256 and 512x512").
    Permanent: a property of the files (retrying gives the same result). Not
    permanent: the environment (a missing file, memory, the database).
    """

    def __init__(self, reason: str, permanent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def is_panic(error: BaseException) -> bool:
    """A Rust panic surfaced by pyo3 (its class is created at run time, so it is matched by name)."""
    return type(error).__name__ == "PanicException"


def out_of_memory(error: BaseException) -> bool:
    """MemoryError, or torch's allocation failures (RuntimeErrors: CUDA "out of memory", or the CPU
    allocator's "can't allocate memory"): the machine, not the series; worth a retry later."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def describe(error: BaseException, what: str = "native code", with_type: bool = True) -> str:
    """The reason text for an error that is not a SeriesError (`what` names the panicking part)."""
    if is_panic(error):
        return f"{what} panicked: {one_line(error)}"
    if isinstance(error, MemoryError):
        return f"out of memory{': ' + one_line(error) if str(error) else ''}"
    return f"{type(error).__name__}: {one_line(error)}" if with_type else one_line(error)


class WeightsError(Exception):
    """Weights on disk that cannot be used (missing card, bad checksum, wrong shapes, a backbone package not
    installed). Defined here, re-exported by models.inference.networks, so that models.inference.backbones can raise it without
    importing models.inference.networks (which imports it)."""
