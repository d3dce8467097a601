"""The one error a job raises when it cannot start; every layer may raise it, none imports up."""


class JobError(Exception):
    """The job cannot start (exit 1); no file has been touched."""
