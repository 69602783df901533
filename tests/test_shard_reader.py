"""atlasdgd's own chunk reader for the count arrays it writes: the values zarr reads, or no reader."""

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from atlasdgd.store.shard_reader import ShardedBloscArray
from atlasdgd.store.zarr_store import COMPRESSOR

CHUNK, SHARD = 64, 256


def _array(path, values, **options):
    """A 1-D array as the store writer makes it (blosc chunks in shards), unless ``options`` say otherwise."""
    kwargs = {"chunks": (CHUNK,), "shards": (SHARD,), "compressors": COMPRESSOR, **options}
    array = zarr.create_array(str(path), shape=values.shape, dtype=values.dtype, **kwargs)
    array[:] = values
    return zarr.open_array(str(path), mode="r")


@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_every_range_reads_as_zarr_reads_it(tmp_path, dtype):
    # 1,000 values: 3 whole shards and a partial fourth, whose last chunk is partial too
    rng = np.random.default_rng(0)
    values = rng.poisson(2.0, 1000).astype(dtype)
    values[CHUNK : 2 * CHUNK] = 0  # a chunk of fill values: zarr does not write it
    array = _array(tmp_path / "x", values)
    reader = ShardedBloscArray.open(array)
    assert reader is not None
    edges = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, SHARD - 1, SHARD, SHARD + 1, 999, 1000]
    ranges = [(a, b) for a in edges for b in edges if a <= b] + [tuple(sorted(rng.integers(0, 1001, 2))) for _ in range(50)]
    for start, stop in ranges:
        out = np.full(stop - start, -7, dtype=dtype)
        reader.read(start, stop, out)
        np.testing.assert_array_equal(out, values[start:stop], err_msg=f"[{start}, {stop})")


def test_a_shard_never_written_reads_as_the_fill_value(tmp_path):
    values = np.zeros(3 * SHARD, dtype=np.float32)
    values[:10] = 1.0  # only the first shard has a non-fill chunk
    array = _array(tmp_path / "x", values)
    assert not (tmp_path / "x" / "c" / "2").exists()
    out = np.full(len(values), -1.0, dtype=np.float32)
    ShardedBloscArray.open(array).read(0, len(values), out)
    np.testing.assert_array_equal(out, values)


def test_arrays_it_does_not_know_are_left_to_zarr(tmp_path):
    values = np.arange(500, dtype=np.float32)
    assert ShardedBloscArray.open(_array(tmp_path / "zstd", values, compressors=ZstdCodec())) is None
    assert ShardedBloscArray.open(_array(tmp_path / "unsharded", values, shards=None)) is None
    memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(500,), dtype=np.float32, chunks=(CHUNK,),
                               shards=(SHARD,), compressors=COMPRESSOR)
    assert ShardedBloscArray.open(memory) is None
    two_d = zarr.create_array(str(tmp_path / "2d"), shape=(10, 10), dtype=np.float32, chunks=(5, 5),
                              shards=(10, 10), compressors=COMPRESSOR)
    assert ShardedBloscArray.open(two_d) is None


def test_a_damaged_shard_index_or_a_bad_range_is_an_error(tmp_path):
    array = _array(tmp_path / "x", np.arange(1, 501, dtype=np.float32))
    reader = ShardedBloscArray.open(array)
    with pytest.raises(ValueError, match="range"):
        reader.read(10, 600, np.empty(590, dtype=np.float32))
    with pytest.raises(ValueError, match="range"):
        reader.read(0, 10, np.empty(5, dtype=np.float32))
    shard = tmp_path / "x" / "c" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the index, before its checksum
    shard.write_bytes(bytes(raw))
    with pytest.raises(OSError, match="damaged"):
        ShardedBloscArray.open(array).read(0, 10, np.empty(10, dtype=np.float32))
