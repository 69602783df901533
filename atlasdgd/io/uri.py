"""URIs as fsspec file systems: local paths, file://, memory://, s3:// and any other fsspec protocol."""

from __future__ import annotations

from atlasdgd.errors import AtlasDGDError


def is_remote(uri) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def filesystem(uri: str, storage_options: dict | None = None, error: type[Exception] = AtlasDGDError):
    """``(fs, path)`` for a URI; plain paths are local files. Unknown protocols or a missing backend
    raise ``error`` naming the package to install."""
    import fsspec  # imported here: the training core runs without fsspec

    try:
        return fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    except (ImportError, ValueError) as e:
        extra = " (pip install 'atlasdgd[s3]')" if str(uri).startswith(("s3://", "s3a://")) else ""
        raise error(f"cannot open {uri!r}: {e}: install the fsspec backend for this protocol, e.g. s3fs for "
                    f"s3://{extra}") from e
