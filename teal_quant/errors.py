"""User-facing errors: the CLI turns each into one line on stderr and exit code 2."""


class TealQuantError(Exception):
    """Base of every error caused by the user's input (recipe, model, artifact, data)."""


class RecipeError(TealQuantError):
    """A recipe is malformed; the message names the YAML path of the field and the problem."""


class ModelSourceError(TealQuantError):
    """The base model cannot be found, read, or is of an unsupported architecture."""


class DataError(TealQuantError):
    """A calibration or evaluation text source cannot be read or yields too few tokens."""


class ArtifactError(TealQuantError):
    """An artifact directory is missing, corrupt, truncated or of an unknown format version."""


class HubError(TealQuantError):
    """A Hub operation (push, download) failed: network, authentication, permissions, repo type, offline mode."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can span pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class MissingExtraError(TealQuantError):
    """An optional feature whose extra is not installed (e.g. plots without matplotlib)."""
