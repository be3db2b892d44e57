"""The HDF5 shard cache: ``DIR/manifest.json`` plus ``DIR/shard-NNNNN.h5`` files.

:class:`CacheWriter` writes shards atomically and resumably under a directory lock (several
ranks may share one directory); :class:`Cache` reads the item table, one layer of one site at a
time, and the cached log-probs, and verifies shard hashes (the verification stamp of
:mod:`probekit.store.stamp` lets a repeated check skip shards unchanged since their last hash).
:func:`write_cache` writes a whole cache from arrays (or a per-shard callable) through the same
writer. The shard layout is documented in :mod:`probekit.store.layout`.

The other outputs have their format, writer and reader here too: the results table
(:mod:`probekit.store.results`), ICL score folders (:mod:`probekit.store.icl_scores`) and
``hardness.json`` (:mod:`probekit.store.hardness`); every output directory is locked and
committed as :mod:`probekit.store.outdir` describes.
"""

from probekit.store.layout import FORMAT, SITES, Layout, shard_name
from probekit.store.reader import Cache
from probekit.store.writer import CacheWriter, ShardWriter, write_cache

__all__ = ["FORMAT", "SITES", "Cache", "CacheWriter", "Layout", "ShardWriter", "shard_name", "write_cache"]
