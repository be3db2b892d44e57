"""Statistics over item x draw accuracy matrices: crossed bootstrap, SGR (with when it is
estimable and its Fieller-type interval), paired differences, p-values that agree with their
intervals, Benjamini-Hochberg q-values.

See :mod:`probekit.stats.bootstrap` for the resampling scheme (docs/protocol.md §6) and
:mod:`probekit.stats.shared` for statistics that share their item resamples (a report's, §6.1).
"""

from probekit.stats.bootstrap import (
    P_VALUES,
    BootstrapTest,
    CrossedBootstrap,
    Fieller,
    SgrTest,
    bh_qvalues,
    centred_p_value,
    crossed_bootstrap,
    crossed_resample_stats,
    difference_resample_stats,
    drop_empty,
    fieller_interval,
    p_value,
    paired_difference,
    percentile_p_value,
    resample_indices,
    sgr_bootstrap,
    sgr_estimable,
    sgr_resample_parts,
    sgr_resample_stats,
)
from probekit.stats.shared import SharedBootstrap

__all__ = [
    "P_VALUES",
    "BootstrapTest",
    "CrossedBootstrap",
    "Fieller",
    "SgrTest",
    "SharedBootstrap",
    "bh_qvalues",
    "centred_p_value",
    "crossed_bootstrap",
    "crossed_resample_stats",
    "difference_resample_stats",
    "drop_empty",
    "fieller_interval",
    "p_value",
    "paired_difference",
    "percentile_p_value",
    "resample_indices",
    "sgr_bootstrap",
    "sgr_estimable",
    "sgr_resample_parts",
    "sgr_resample_stats",
]
