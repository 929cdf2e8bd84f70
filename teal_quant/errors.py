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


class Terminated(BaseException):
    """SIGTERM arrived (a scheduler, `kill`): raised in the main thread like KeyboardInterrupt, so every `with` block
    cleans up (a staged artifact is removed); the CLI exits 143."""


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C), raised by the CLI's own handler: a subclass, so that a KeyboardInterrupt seen on its way
    through C code is not taken by the interpreter for an unhandled one (which would end the process with SIGINT
    instead of the CLI's exit code 130)."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can span pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_HF_TOKEN_SHAPE = r"hf_[A-Za-z0-9_\-]{6,}"
_BEARER = r"(?i)(bearer\s+)[^\s'\",;)\]}]+"


def known_tokens(*extra: str | None) -> set[str]:
    """Every form a Hub token can take here: the given ones, HF_TOKEN / HUGGING_FACE_HUB_TOKEN and the `hf auth login`
    file (raw and stripped the way huggingface_hub strips them)."""
    import os

    raw = [*extra, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    try:
        from huggingface_hub import constants

        for path in (constants.HF_TOKEN_PATH,):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    raw.append(f.read(4096))
            except OSError:
                pass
    except ImportError:
        pass
    found: set[str] = set()
    for value in raw:
        if not value:
            continue
        for form in (value, value.strip(), value.replace("\r", "").replace("\n", "").strip()):
            if len(form) >= 4:
                found.add(form)
    return found


def scrub(text: str, *tokens: str | None) -> str:
    """`text` with every known token, `Bearer <anything>` and anything shaped like `hf_...` replaced by ***."""
    import re

    for secret in sorted(known_tokens(*tokens), key=len, reverse=True):
        text = text.replace(secret, "***")
    text = re.sub(_BEARER, r"\1***", text)
    return re.sub(_HF_TOKEN_SHAPE, "hf_***", text)


def quote(text: object, limit: int = 200) -> str:
    """A user-given value for an error line: at most `limit` characters (a 10 MB argument is never echoed whole)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class MissingExtraError(TealQuantError):
    """An optional feature whose extra is not installed (e.g. plots without matplotlib)."""
