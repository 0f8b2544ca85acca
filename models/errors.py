"""Errors the imaging pipeline reports about a series (plain, no I/O)."""


class SeriesError(Exception):
    """A series the pipeline cannot process; `permanent` skips the retries.

    The reason is stored with the series, so it should say what is wrong in
    words an IT person can act on ("mixed image sizes: 256x256 and 512x512").
    """

    def __init__(self, reason: str, permanent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
