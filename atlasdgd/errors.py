"""Errors raised for user-facing problems (bad input, bad files), each naming the fix."""


class AtlasDGDError(Exception):
    """Base class of atlasdgd's user-facing errors."""


class InputError(AtlasDGDError, ValueError):
    """The data given to atlasdgd cannot be used as it is."""


class ModelFileError(AtlasDGDError, OSError):
    """A model directory is missing, incomplete or written by an incompatible version."""


class ArgumentError(AtlasDGDError, TypeError):
    """A call got a keyword argument it does not take (the message lists the valid ones)."""


def missing_extra(feature: str, package: str, extra: str) -> AtlasDGDError:
    """The error for an optional dependency that is not installed, naming the extra that brings it."""
    return AtlasDGDError(f"{feature} needs {package}, which is not installed: pip install 'atlasdgd[{extra}]'")


def check_arguments(call: str, given, valid) -> None:
    """Refuse keyword arguments of ``call`` outside ``valid``, suggesting the closest valid names."""
    import difflib

    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise ArgumentError(f"{call} got unknown argument{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                        f"valid are: {', '.join(sorted(valid))}")
