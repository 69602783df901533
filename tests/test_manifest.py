"""The one versioned-manifest reader behind model directories, atlas stores and checkpoints."""

import json

import pytest

from atlasdgd.artifact import MODEL_MANIFEST
from atlasdgd.io.manifest import read_manifest
from atlasdgd.io.uri import filesystem
from atlasdgd.store.format import STORE_MANIFEST
from atlasdgd.train.checkpoint import CHECKPOINT_MANIFEST


@pytest.mark.parametrize("kind", [MODEL_MANIFEST, STORE_MANIFEST, CHECKPOINT_MANIFEST], ids=lambda k: k.file)
def test_each_kind_refuses_torn_damaged_foreign_and_newer_directories(kind, tmp_path):
    fs, root = filesystem(str(tmp_path))
    with pytest.raises(kind.error, match=f"not a complete {kind.noun}"):
        read_manifest(fs, root, kind)
    good = {"format": kind.format, "format_version": kind.version, "atlasdgd_version": "0.1.0", "extra": 1}
    (tmp_path / kind.file).write_text(json.dumps(good))
    assert read_manifest(fs, root, kind) == good
    cases = [("{torn", "not valid JSON"), (json.dumps({**good, "format": "other"}), "format 'other'"),
             (json.dumps([1, 2]), "format 'list'"), (json.dumps({**good, "format_version": 99}), "format version 99")]
    for text, message in cases:
        (tmp_path / kind.file).write_text(text)
        with pytest.raises(kind.error, match=message):
            read_manifest(fs, root, kind)
