"""`probekit extract`: run a question set through a model once and cache hidden states and log-probs."""

from __future__ import annotations

from pathlib import Path

import typer

from probekit.cli import app
from probekit.cli.common import DEVICE_HELP, DTYPE_HELP, QUANTIZE_HELP, clean_errors, console, model_spec


def _default_out(model: str | None, quantize: str | None, bnb_type: str, dataset: str, limit: int | None,
                 icl: int | None, demos_from: str, measure: str, demos: str | None = None,
                 test_levels: list[str] | None = None, demos_measure: str | None = None,
                 template: str | None = None, demos_cutoff: str | None = None) -> Path:
    from probekit.llm.weights import DEFAULT_NAME, model_slug

    slug = model_slug(model) if model else DEFAULT_NAME
    if quantize:
        slug += f"-{quantize}" + (f"-{bnb_type}" if quantize == "4bit" else "")
    data = model_slug(dataset)
    if limit:
        data += f"-first{limit}"
    if template:
        data += f"-{template}"
    out = f"{slug}__{data}"
    if icl:
        pool = f"{demos_from}-{demos_measure or measure}" if demos_from != "all" else "all"
        if demos_cutoff:
            pool += "-cut" + demos_cutoff.partition("=")[2].replace(",", "-")
        out += f"__icl-k{icl}-" + (f"{model_slug(demos)}-" if demos else "") + pool
        if test_levels:
            out += f"-test-{'+'.join(test_levels)}-{measure}"
    from probekit.llm.weights import default_cache_root

    return default_cache_root() / out


@app.command("extract")
def extract_cmd(
    dataset: str = typer.Option("bundled", "--dataset", "-d",
                                help="arc | mmlu | strategyqa | gsm8k | bundled (offline ARC sample) | FILE.jsonl/.csv"),
    data_dir: str | None = typer.Option(None, "--data-dir", help="Folder with the original files (arc/, mmlu/, ...); "
                                           "default: $PROBEKIT_DATA_DIR, else the Hugging Face hub."),
    model: str | None = typer.Option(None, "--model", "-m", help="Hub id, local folder, FILE.gguf or gemma3-270m (offline Gemma-3-270M, `make gemma`); "
                                        "default: the offline SmolLM2-135M-Instruct (converted once under the cache root)."),
    dtype: str = typer.Option("auto", "--dtype", help=DTYPE_HELP),
    quantize: str = typer.Option("auto", "--quantize", help=QUANTIZE_HELP),
    bnb_4bit_type: str = typer.Option("nf4", "--bnb-4bit-type", help="4-bit quantization type: nf4 | fp4."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    device_map: str | None = typer.Option(None, "--device-map", help="'auto' spreads a large model over all GPUs."),
    layers: str = typer.Option("all", "--layers", help="all | middle_and_last | middle | last | comma-separated hidden_states "
                               "indices (0 = embeddings, L = last, -1 = L); the grammar `probekit sweep --layers` reads."),
    sites: str = typer.Option("answer_end,question_end", "--sites", help="Token positions: answer_end, question_end."),
    batch_size: int = typer.Option(8, "--batch-size", help="Items per forward pass (all choices of an item share one row)."),
    shard_size: int = typer.Option(256, "--shard-size", help="Items per HDF5 shard (the unit of resuming)."),
    store_dtype: str = typer.Option("auto", "--store-dtype", help="auto | float16 | bfloat16 | float32: how the cache stores hidden states. bfloat16 has float32's range (stored as uint16 bits, see docs/formats.md); auto is float16 unless the first batch of items passes 65504/4, then bfloat16 (a float16 choice gives the same cache as --store-dtype float16)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Cache directory; default cache/<model-slug>__<dataset>."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N items."),
    template: str | None = typer.Option(None, "--template", help="Prompt template instead of the set's: cloze (\"Question: {q}\\nAnswer:\", no choices listed), 0040, 0306."),
    icl: int | None = typer.Option(None, "--icl", help="Score k-shot prompts with K demonstrations instead of caching hidden states."),
    demos_from: str | None = typer.Option(None, "--demos-from", help="Level the ICL demonstrations come from: easy "
                                          "(default) | medium | hard | all (every probe item)."),
    measure: str | None = typer.Option(None, "--measure", help="Difficulty measure that defines the ICL level (and "
                                       "the test levels); default grade."),
    demos_dataset: str | None = typer.Option(None, "--demos-dataset", help="Take the ICL demonstrations from this "
                                             "question set's --demos-from level (e.g. arc), scoring --dataset."),
    demos_cutoff: str | None = typer.Option(None, "--demos-cutoff", help="ICL: cut the demonstrations' measure "
                                            "with this rule instead of its default, MEASURE=EASY_MAX,HARD_MIN or "
                                            "MEASURE=qLO,qHI (e.g. grade=3,8: third-grade ARC demonstrations, as the "
                                            "paper's Figure 1); their rows' level names it (easy@grade=3,8)."),
    demos_measure: str | None = typer.Option(None, "--demos-measure", help="Measure that cuts --demos-dataset into "
                                             "levels (default: --measure)."),
    test_levels: str | None = typer.Option(None, "--test-levels", help="ICL: score only the probe items at these "
                                           "levels of --measure, e.g. hard."),
    draws: int | None = typer.Option(None, "--draws", help="ICL draws of demonstrations (default 5)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the ICL draws (default 0)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Run a question set through a model once; cache hidden states and choice log-probs.

    Every item is rendered with its set's prompt (ARC/MMLU "0040", StrategyQA "0306") or the --template given; the prompt runs once per item and all its answer choices are scored as continuations of it. Hidden states at the requested layers and token positions go to DIR/shard-NNNNN.h5 (float16, or bfloat16 for a model whose hidden states need the range: --store-dtype) with a manifest; rerunning the same command finishes an interrupted cache. Under torchrun each rank writes its own shards into the same directory.

    With --icl K, every probe item is instead scored under K-shot prompts whose demonstrations are drawn from one difficulty level (or, with --demos-from all, from every probe item; with --demos-dataset, from a level of another question set); choice log-probs per draw go to DIR/icl.json and DIR/draw-NNN.h5. --test-levels scores only the items of those levels.

    \b
    Example:
      probekit extract --dataset bundled --limit 64
      probekit extract --dataset arc --data-dir ../shared/data --layers all --batch-size 16
      probekit extract --dataset arc --data-dir ../shared/data --model meta-llama/Llama-2-7b-hf --quantize 8bit --device cuda
      torchrun --nproc-per-node 4 --no-python probekit extract --dataset mmlu --model ./llama-13b --out cache/l13__mmlu
      probekit extract --dataset arc --data-dir ../shared/data --icl 10 --demos-from easy --measure grade --draws 5
      probekit extract --dataset mmlu --data-dir ../shared/data --icl 10 --demos-dataset arc --demos-measure grade \\
          --demos-from easy --measure human_hardness --test-levels hard
      probekit extract --dataset arc --data-dir ../shared/data --model gemma3-270m --template cloze
    """
    with clean_errors():
        from probekit.data import load_dataset
        from probekit.errors import ProbekitError

        if limit is not None and limit < 1:
            raise ProbekitError(f"--limit {limit}: must be a positive integer")
        spec = model_spec(model, dtype=dtype, quantize=quantize, device=device, device_map=device_map, threads=threads,
                          bnb_4bit_type=bnb_4bit_type)
        icl_only = {"--demos-dataset": demos_dataset, "--demos-measure": demos_measure, "--test-levels": test_levels,
                    "--demos-from": demos_from, "--measure": measure, "--draws": draws, "--seed": seed,
                    "--demos-cutoff": demos_cutoff}
        given = [name for name, value in icl_only.items() if value is not None]
        if icl is None and given:
            raise ProbekitError(f"{' '.join(f'{n} {icl_only[n]}' for n in given)}: "
                                f"{'applies' if len(given) == 1 else 'apply'} to --icl K only (an extraction draws "
                                "no demonstrations)")
        levels = [x.strip() for x in test_levels.split(",") if x.strip()] if test_levels is not None else None
        if test_levels is not None and not levels:
            raise ProbekitError(f"--test-levels {test_levels!r}: name at least one level (easy, medium, hard)")
        demos_from, measure = demos_from or "easy", measure or "grade"
        draws, seed = 5 if draws is None else draws, 0 if seed is None else seed
        cut = None
        if demos_cutoff is not None:
            from probekit.data.levels import parse_cutoff

            name, eq, rule = demos_cutoff.partition("=")
            if not eq or name.strip() != (demos_measure or measure):
                raise ProbekitError(f"--demos-cutoff {demos_cutoff!r}: expected {demos_measure or measure}=EASY_MAX,"
                                    "HARD_MIN or =qLO,qHI, naming the demonstrations' measure")
            cut = parse_cutoff(rule)
        items = load_dataset(dataset, data_dir=data_dir)
        demos = load_dataset(demos_dataset, data_dir=data_dir) if demos_dataset else None
        target = out or _default_out(model, spec.resolved().quantize, bnb_4bit_type, items.name if Path(dataset).suffix == "" else Path(dataset).stem,
                                     limit, icl, demos_from, measure, demos.name if demos else None, levels,
                                     demos_measure, template, demos_cutoff)
        common = dict(limit=limit, template=template, progress=not no_progress, batch_size=batch_size)
        if icl is not None:
            from probekit.extract.icl import extract_icl

            summary = extract_icl(items, target, spec, k=icl, demos_from=demos_from, measure=measure,
                                  demos_items=demos, demos_measure=demos_measure, demos_cutoff=cut, test_levels=levels,
                                  draws=draws, seed=seed, **common)
        else:
            from probekit.extract.run import extract

            summary = extract(items, target, spec, layers=layers, sites=sites, shard_size=shard_size,
                              store_dtype=store_dtype, **common)
        console.print(summary.line(), highlight=False, soft_wrap=True)
