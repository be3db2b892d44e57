"""probekit: hidden-state cache and linear probing for easy-to-hard generalization studies.

Data flows one way: ``data`` (question sets, difficulty, levels, draws) -> ``extract`` (one LLM
pass) -> ``store`` (HDF5 shard cache) -> ``probe`` (JAX sweep of linear heads) -> ``stats``
(bootstraps, SGR) -> ``report`` (tables, plots).
"""

from probekit.errors import ProbekitError

__version__ = "0.1.0"
__all__ = ["ProbekitError", "__version__"]
