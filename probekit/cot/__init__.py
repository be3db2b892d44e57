"""Chain-of-thought generation and answer scoring (docs/protocol.md §12), on the LLM runtime of
:mod:`probekit.llm`.

Public entry point::

    from probekit.cot import generate_cot   # also probekit.generate
    summary = generate_cot(items, "cot/smollm2__gsm8k", conditions="zero_shot,easy,hard", k=8, n_test=150)

:mod:`probekit.cot.run` plans and writes the run, :mod:`probekit.cot.decode` the batched greedy decoding
with a shared prefix, :mod:`probekit.cot.tune` the QLoRA-CoT adapters, :mod:`probekit.cot.answers` the
answer extraction and scoring.
"""

from probekit.cot.run import GenerateSummary, generate_cot

__all__ = ["GenerateSummary", "generate_cot"]
