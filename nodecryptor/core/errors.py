"""Errors that are part of nodecryptor's API: each names what is wrong and with what value."""


class NodecryptorError(Exception):
    """Base class for errors nodecryptor raises on purpose."""


class SettingsError(NodecryptorError, ValueError):
    """A flag or setting has a value nodecryptor cannot use.

    ``flag`` is the option as the user spelled it (``--control-plane-exempt-ports``) so the CLI
    can name it; ``value`` is the offending value.
    """

    def __init__(self, flag: str, value: object, why: str):
        self.flag = flag
        self.value = value
        self.why = why
        super().__init__(f"invalid value {value!r} for {flag}: {why}")


class NotSupported(NodecryptorError):
    """A kernel or library feature is missing. ``feature`` names it; ``why`` says what probing
    saw."""

    def __init__(self, feature: str, why: str, minimum: str | None = None):
        self.feature = feature
        self.why = why
        self.minimum = minimum
        extra = f" (needs {minimum})" if minimum else ""
        super().__init__(f"{feature} not supported: {why}{extra}")


class DatapathError(NodecryptorError):
    """Applying or observing the datapath failed; the reconcile loop retries."""
