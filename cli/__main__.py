"""`python -m probekit.cli ...`, e.g. under `torchrun --nproc-per-node N -m probekit.cli extract ...`."""

from probekit.cli import main

main()
