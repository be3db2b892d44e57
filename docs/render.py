"""Render the numbers the docs show from the reports' summaries, so that no number in them is typed.

    python docs/render.py trim REPORT_DIR NAME   # docs/results/NAME.json: the fields the docs show (+ the plots they show)
    python docs/render.py trim SELECT_DIR NAME   # the same for a `probekit finetune-select` directory
    python docs/render.py                        # rewrite every rendered block of README.md and docs/*.md
    python docs/render.py --check                # exit 1 naming each block that differs from its rendering

A rendered block is the text between a line ``<!-- render KIND NAME [KEY=VALUE ...] -->`` and the next
``<!-- /render -->``; NAME is a trimmed summary in ``docs/results/``. Kinds:

- ``comparison``: a comparison report's table (``methods=probe,icl``: which methods get columns;
  ``models=...``, ``datasets=...``, ``measures=...``: which rows).
- ``headline``: a single-run report's headline table, as ``probekit report`` prints it.
- ``zero-weights``: per run, how many of the headline heads have zero weights as their exact optimum.
- ``controls``: per row, the hard-trained probe beside its shortcut controls.
- ``facts``: counts a reading refers to (estimable SGRs, q < 0.05, rows beating their controls, ...).
- ``treatments``: a single-run report's headline under each treatment of zero-weight heads (chance,
  exclude, include): the easy- and hard-trained accuracies and the SGR.
- ``warnings``: the report's warnings (conditions with fewer than 3 draws).
- ``selection``: a ``probekit finetune-select`` search (NAME trimmed from its ``selection.json``):
  validation accuracy and NLL per learning rate and update count, zero-shot, and the choice.
- ``cli`` (no NAME): every command's help, example and options, read from the command-line app.

``tests/test_docs.py`` checks that every committed block equals its rendering.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(<!-- render (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /render -->)", re.S)

STAT = ("point", "lo", "hi", "p_value", "q_value", "estimable", "reason", "den_lo", "den_hi", "fieller", "n_draws")


def _stat(stat: dict | None) -> dict | None:
    return None if stat is None else {k: stat[k] for k in STAT if k in stat}


def _record(r: dict) -> dict:
    keep = {k: r[k] for k in ("model", "dataset", "method", "method_label", "measure", "site", "layer", "solver",
                              "baseline", "beats_controls", "zero_weight_heads", "n_train") if k in r}
    keep["accuracy"] = {lv: _stat(a) for lv, a in r["accuracy"].items()}
    for key in ("sgr", "hard_minus_easy", "easy_minus_zero_shot"):
        keep[key] = _stat(r.get(key))
    if r.get("controls") is not None:
        keep["controls"] = {site: {"accuracy": {lv: _stat(a) for lv, a in c["accuracy"].items()},
                                   "hard_minus_control": _stat(c["hard_minus_control"])}
                            for site, c in r["controls"].items()}
    return keep


def trim(summary: dict) -> dict:
    """The fields of a report's (or a comparison's) summary that the docs render."""
    settings = {k: summary["settings"].get(k) for k in ("n_boot", "n_boot_sgr", "seed", "level", "p_value",
                                                          "zero_weights", "multiplicity", "headline",
                                                          "headline_method")}
    out = {"format": summary["format"], "settings": settings, "warnings": summary.get("warnings", [])}
    if "runs" in summary:  # a comparison
        out["runs"] = [{k: r[k] for k in ("model", "dataset", "sha256", "n_rows")} for r in summary["runs"]]
        out["population"] = [_record(r) for r in summary["population"]]
        out["notes"] = summary.get("notes", [])
        return out
    head = summary["settings"]["headline"]
    out["results_sha256"] = summary["results"]["sha256"]
    out["population"] = [_record(r) for r in summary["population"]
                         if head and (r["site"], r["layer"], r["solver"]) == (head["site"], head["layer"], head["solver"])]
    out["zero_weight_heads"] = {k: summary["zero_weight_heads"][k] for k in ("treatment", "heads", "zero_weight_heads")}
    out["zero_weight_treatments"] = {
        t: {m: {"accuracy": {lv: _stat(a) for lv, a in v["accuracy"].items()}, "sgr": _stat(v["sgr"])}
            for m, v in by.items()} if "error" not in by else by
        for t, by in summary.get("zero_weight_treatments", {}).items()}
    return out


def trim_selection(selection: dict) -> dict:
    """The fields of a ``finetune-select`` search that the docs render."""
    keep = ("format", "dataset", "head", "split", "search", "criterion", "zero_shot", "points", "complete", "chosen",
            "seconds")
    out = {k: selection[k] for k in keep}
    out["split"] = {k: v for k, v in selection["split"].items() if k != "validation_ids"}
    out["recipe"] = {k: selection["recipe"][k] for k in ("r", "alpha", "target_modules", "max_batch",
                                                         "final_lr_fraction", "weight_decay")}
    return out


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found (make it with `python docs/render.py trim REPORT_DIR {name}`)")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------------------------
# Kinds


def _opts(args: list[str]) -> dict[str, list[str]]:
    return {k: v.split(",") for k, _, v in (a.partition("=") for a in args)}


def _rows(summary: dict, opts: dict) -> list[dict]:
    rows = summary["population"]
    for key in ("models", "datasets", "measures"):
        if key in opts:
            rows = [r for r in rows if r[key[:-1]] in opts[key]]
    return rows


def comparison(summary: dict, opts: dict) -> str:
    from probekit.report.tables import NOT_ESTIMABLE, control_verdict, fmt_acc, fmt_q, fmt_sgr, sgr_flagged

    methods = opts.get("methods", ["probe", "icl"])
    rows = _rows(summary, opts)
    keys = sorted({(r["model"], r["dataset"], r["measure"]) for r in rows})
    head = ["model", "dataset", "measure", "zero-shot"]
    for m in methods:
        head += [f"{m} easy→hard", f"{m} hard→hard", f"{m} SGR [95% CI]", f"{m} q"]
        if m == "probe":
            head += ["probe vs controls"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, dataset, measure in keys:
        by = {r["method"]: r for r in rows if (r["model"], r["dataset"], r["measure"]) == (model, dataset, measure)}
        zero = next((r["accuracy"].get("zero_shot") for r in by.values() if r["accuracy"].get("zero_shot")), None)
        cells = [model, dataset, measure, fmt_acc(zero)]
        for m in methods:
            r = by.get(m)
            if r is None:
                cells += ["", "", "", ""] + ([""] if m == "probe" else [])
                continue
            sgr = r["sgr"]
            text = fmt_sgr(sgr)
            if sgr_flagged(sgr):
                text = f"{NOT_ESTIMABLE} ({sgr['reason'].removeprefix('hard - zero-shot interval ')})"
            cells += [fmt_acc(r["accuracy"].get("easy")), fmt_acc(r["accuracy"].get("hard")), text, fmt_q(sgr)]
            if m == "probe":
                cells += [control_verdict(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def headline(summary: dict, opts: dict) -> str:
    from rich.console import Console

    import probekit.cli.report_cmd as report_cmd

    buffer = io.StringIO()
    before = report_cmd.console
    report_cmd.console = Console(file=buffer, width=int(opts.get("width", ["110"])[0]), color_system=None,
                                 highlight=False)
    try:
        report_cmd._print_headline(summary)
    finally:
        report_cmd.console = before
    text = "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())
    return f"```\n{text}\n```\n"


def zero_weights(summary: dict, opts: dict) -> str:
    rows = [r for r in _rows(summary, opts) if r["method"] == "probe"] if "runs" in summary else summary["population"]
    levels = [lv for lv in ("easy", "medium", "hard", "all") if any(lv in (r.get("zero_weight_heads") or {}) for r in rows)]
    lines = ["| model | dataset | measure | " + " | ".join(levels) + " |", "|---|---|---|" + "---|" * len(levels)]
    for r in sorted(rows, key=lambda r: (r.get("model", ""), r.get("dataset", ""), r["measure"])):
        z = r.get("zero_weight_heads") or {}
        cells = [f"{z[lv]} of {r['accuracy'][lv]['n_draws']}" if lv in z and r["accuracy"].get(lv) else "–"
                 for lv in levels]
        lines.append(f"| {r.get('model', '')} | {r.get('dataset', '')} | {r['measure']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def controls(summary: dict, opts: dict) -> str:
    from probekit.report.tables import control_verdict, fmt_acc, fmt_test

    rows = [r for r in _rows(summary, opts) if r.get("controls")]
    lines = ["| model | dataset | measure | probe hard→hard | surface hard→hard | majority hard→hard | "
             "probe − surface (pts) | probe − majority (pts) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("model", ""), r.get("dataset", ""), r["measure"])):
        c = r["controls"]
        cells = [fmt_acc(r["accuracy"].get("hard"))]
        cells += [fmt_acc((c.get(s) or {}).get("accuracy", {}).get("hard")) for s in ("surface", "majority")]
        cells += [fmt_test((c.get(s) or {}).get("hard_minus_control"), percent=True).split(" p")[0]
                  for s in ("surface", "majority")]
        lines.append(f"| {r.get('model', '')} | {r.get('dataset', '')} | {r['measure']} | " + " | ".join(cells)
                     + f" | {control_verdict(r)} |")
    return "\n".join(lines) + "\n"


def facts(summary: dict, opts: dict) -> str:
    from probekit.report.tables import sgr_flagged

    rows = _rows(summary, opts)
    if "methods" in opts:
        rows = [r for r in rows if r.get("method") in opts["methods"]]
    sgrs = [r for r in rows if r.get("sgr")]
    estimable = [r for r in sgrs if not sgr_flagged(r["sgr"])]
    p05 = [r for r in estimable if r["sgr"]["p_value"] < 0.05]
    q05 = [r for r in sgrs if (r["sgr"].get("q_value") or 1.0) < 0.05]
    probes = [r for r in rows if r.get("beats_controls") is not None]
    beaten = [r for r in probes if not r["beats_controls"]]
    in_range = [r for r in estimable if 0.7 <= r["sgr"]["point"] <= 1.0]

    def names(rs):
        return ", ".join(" ".join(str(r[k]) for k in ("model", "dataset", "measure", "method") if r.get(k))
                         for r in rs) or "none"

    family = (summary["settings"].get("multiplicity") or {}).get("size")
    lines = [f"- SGRs in the table: {len(sgrs)}; estimable (hard training beats zero-shot): {len(estimable)}.",
             f"- Estimable SGRs with p < 0.05: {len(p05)} ({names(p05)}).",
             f"- SGRs with a Benjamini-Hochberg q < 0.05 (family: {family} SGRs): {len(q05)} ({names(q05)}).",
             f"- Estimable SGRs whose point lies in the paper's 0.7-1.0: {len(in_range)} ({names(in_range)}).",
             f"- Probe rows that do not beat a shortcut control: {len(beaten)} of {len(probes)} ({names(beaten)})."]
    return "\n".join(lines) + "\n"


def treatments(summary: dict, opts: dict) -> str:
    from probekit.report.tables import fmt_acc, fmt_sgr

    by = summary["zero_weight_treatments"]
    names = [t for t in ("chance", "exclude", "include") if t in by]
    measures = sorted({m for t in names if "error" not in by[t] for m in by[t]})
    head = ["measure"] + [f"{t}: {what}" for t in names for what in ("easy→hard", "hard→hard", "SGR [95% CI]")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in measures:
        cells = [m]
        for t in names:
            r = by[t].get(m) if "error" not in by[t] else None
            if r is None:
                cells += ["–", "–", by[t].get("error", "–") if "error" in by[t] else "–"]
                continue
            cells += [fmt_acc(r["accuracy"].get("easy")), fmt_acc(r["accuracy"].get("hard")), fmt_sgr(r["sgr"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def warnings(summary: dict, opts: dict) -> str:
    return "\n".join(f"- {w}" for w in summary.get("warnings", [])) + "\n" if summary.get("warnings") else "- none\n"


def cli(summary: dict | None, opts: dict) -> str:
    """Every command of ``probekit`` (or those in ``commands=``) with its help, example and options, read
    from the command-line app itself."""
    import typer

    from probekit.cli import app

    group = typer.main.get_command(app)
    wanted = opts.get("commands") or list(group.commands)
    out = []
    for name in wanted:
        cmd = group.commands[name]
        subs = getattr(cmd, "commands", None)
        for sub_name, sub in ([(name, cmd)] + [(f"{name} {k}", v) for k, v in (subs or {}).items()]):
            out += _command(sub_name, sub)
    return "\n".join(out)


def _command(name: str, cmd) -> list[str]:
    help_text = (cmd.help or "").replace("\b\n", "").strip()
    text, _, example = help_text.partition("Example:")
    lines = [f"### `probekit {name}`", "", text.strip(), ""]
    if example.strip():
        lines += ["```bash", *(line[2:] if line.startswith("  ") else line for line in example.strip("\n").splitlines()),
                  "```", ""]
    rows = []
    for p in cmd.params:
        if p.name == "help":
            continue
        flags = " / ".join([*p.opts, *p.secondary_opts]) if p.param_type_name == "option" else p.name.upper()
        empty = p.default is None or p.default is False or p.default == () or p.param_type_name != "option"
        default = "" if empty else f" (default: `{p.default}`)"
        desc = " ".join((getattr(p, "help", None) or "").split()).replace("|", "\\|")
        rows.append(f"| `{flags}` | {desc}{default} |")
    if rows:
        lines += ["| option | what it does |", "|---|---|", *rows, ""]
    return lines


def selection(sel: dict, opts: dict) -> str:
    """Validation accuracy (%) and NLL per learning rate (rows) and update count (columns)."""
    counts = sel["search"]["updates"]
    lines = ["| lr | " + " | ".join(f"{u} updates ({u / sel['split']['updates_per_epoch']:g} ep.)" for u in counts)
             + " |", "|---|" + "---|" * len(counts)]
    zero = sel["zero_shot"]
    lines.append(f"| zero-shot (0 updates) | {100 * zero['accuracy']:.1f}% / {zero['nll']:.3f} |" + " |" * (len(counts) - 1))
    at = {(p["lr"], p["updates"]): p for p in sel["points"]}
    chosen = sel.get("chosen") or {}
    for lr in sel["search"]["lrs"]:
        cells = []
        for u in counts:
            p = at.get((lr, u))
            text = "" if p is None else f"{100 * p['accuracy']:.1f}% / {p['nll']:.3f}"
            cells.append(f"**{text}**" if p is not None and (lr, u) == (chosen.get("lr"), chosen.get("updates")) else text)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    split, head, search = sel["split"], sel["head"], sel["search"]
    runs = len(search["lrs"]) * (1 if search["constant_lr"] else len(counts))
    lines += ["", f"Head {head['measure']}/{head['train_level']}, draw {head['draw']}: {split['train']} training and "
              f"{split['validation']} validation items of its {head['n_train']}; {split['updates_per_epoch']} updates "
              f"of {sel['recipe']['max_batch']} items per epoch; {runs} runs in "
              f"{sel['seconds']:.0f} s. Cells: validation accuracy / mean NLL of the gold choice; bold: the choice "
              "(lowest NLL)." if sel.get("chosen") else "The search is not complete: no choice yet."]
    return "\n".join(lines) + "\n"


KINDS = {"comparison": comparison, "selection": selection, "headline": headline, "zero-weights": zero_weights,
         "controls": controls, "facts": facts, "treatments": treatments, "warnings": warnings, "cli": cli}


def render_block(spec: str) -> str:
    kind, *args = spec.split()
    if kind not in KINDS:
        raise SystemExit(f"error: unknown render kind {kind!r} (choose from {', '.join(KINDS)})")
    if kind == "cli":  # read from the app, not from a summary
        return cli(None, _opts(args))
    name, *args = args
    return KINDS[kind](load(name), _opts(args))


def render_text(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("spec")) + m.group(4), text)


def main(argv: list[str]) -> int:
    if argv[:1] == ["trim"]:
        _, report, name = argv
        RESULTS.mkdir(parents=True, exist_ok=True)
        if (Path(report) / "selection.json").is_file():
            sel = json.loads((Path(report) / "selection.json").read_text())
            (RESULTS / f"{name}.json").write_text(json.dumps(trim_selection(sel), indent=1) + "\n")
            return 0
        summary = json.loads((Path(report) / "summary.json").read_text())
        (RESULTS / f"{name}.json").write_text(json.dumps(trim(summary), indent=1, ensure_ascii=False) + "\n")
        shown = "".join(page.read_text() for page in DOCS)
        for plot in ("sgr", "layer_curves"):  # the plots a page shows
            if f"results/{name}_{plot}.png" in shown and (Path(report) / f"{plot}.png").is_file():
                shutil.copyfile(Path(report) / f"{plot}.png", RESULTS / f"{name}_{plot}.png")
        return 0
    check = argv == ["--check"]
    stale = []
    for path in DOCS:
        text = path.read_text()
        new = render_text(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not check:
                path.write_text(new)
    if check and stale:
        print(f"rendered blocks differ from docs/results in {', '.join(map(str, stale))}: "
              "run `python docs/render.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
