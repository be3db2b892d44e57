"""Statistics over item x draw accuracy matrices: crossed bootstrap, SGR, paired differences.

See :mod:`probekit.stats.bootstrap` for the resampling scheme (docs/protocol.md §6).
"""

from probekit.stats.bootstrap import (
    BootstrapTest,
    CrossedBootstrap,
    crossed_bootstrap,
    crossed_resample_stats,
    difference_resample_stats,
    drop_empty,
    p_value,
    paired_difference,
    resample_indices,
    sgr_bootstrap,
    sgr_resample_stats,
)

__all__ = [
    "BootstrapTest",
    "CrossedBootstrap",
    "crossed_bootstrap",
    "crossed_resample_stats",
    "difference_resample_stats",
    "drop_empty",
    "p_value",
    "paired_difference",
    "resample_indices",
    "sgr_bootstrap",
    "sgr_resample_stats",
]
