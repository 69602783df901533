"""Versioned JSON manifests: the one reader for model directories, atlas stores and checkpoints.

Each of these is complete only when its manifest is written (last), and every manifest names its
format and format version, so a torn, foreign or newer-format directory fails with a message that
says what it is and what to do, before anything else is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class ManifestKind:
    file: str  # the manifest's file name
    format: str  # its "format" value
    version: int  # the "format_version" this atlasdgd reads
    noun: str  # what the directory is, for messages ("atlas store")
    error: type[Exception]
    incomplete: str  # what a missing manifest means and what to do
    outdated: str  # what to do about another format version
    family: str = ""  # what it is not, when the format differs ("atlasdgd store"); default noun


def read_manifest(fs, root: str, kind: ManifestKind, where: str | None = None) -> dict:
    """The manifest at ``root`` on ``fs``, checked against ``kind``; ``where`` names it in messages."""
    where = str(root if where is None else where)
    path = f"{str(root).rstrip('/')}/{kind.file}"
    if not fs.exists(path):
        raise kind.error(f"{where!r} has no {kind.file}: it is not a complete {kind.noun}: {kind.incomplete}")
    try:
        raw = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise kind.error(f"{where.rstrip('/')}/{kind.file} is not valid JSON ({e}): the {kind.noun} is damaged") from e
    if not isinstance(raw, dict) or raw.get("format") != kind.format:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise kind.error(f"{where!r} is not an {kind.family or kind.noun} (format {found!r})")
    if raw.get("format_version") != kind.version:
        raise kind.error(f"{where!r} has {kind.noun} format version {raw.get('format_version')}; this atlasdgd reads "
                         f"version {kind.version}: {kind.outdated} (written by atlasdgd {raw.get('atlasdgd_version')})")
    return raw
