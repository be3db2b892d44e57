"""Statistics over item x draw accuracy matrices: crossed bootstrap, SGR (with when it is
estimable), paired differences.

See :mod:`probekit.stats.bootstrap` for the resampling scheme (docs/protocol.md §6) and
:mod:`probekit.stats.shared` for statistics that share their item resamples (a report's, §6.1).
"""

from probekit.stats.bootstrap import (
    BootstrapTest,
    CrossedBootstrap,
    SgrTest,
    crossed_bootstrap,
    crossed_resample_stats,
    difference_resample_stats,
    drop_empty,
    p_value,
    paired_difference,
    resample_indices,
    sgr_bootstrap,
    sgr_estimable,
    sgr_resample_parts,
    sgr_resample_stats,
)
from probekit.stats.shared import SharedBootstrap

__all__ = [
    "BootstrapTest",
    "CrossedBootstrap",
    "SgrTest",
    "SharedBootstrap",
    "crossed_bootstrap",
    "crossed_resample_stats",
    "difference_resample_stats",
    "drop_empty",
    "p_value",
    "paired_difference",
    "resample_indices",
    "sgr_bootstrap",
    "sgr_estimable",
    "sgr_resample_parts",
    "sgr_resample_stats",
]
