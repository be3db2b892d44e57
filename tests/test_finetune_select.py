"""Choosing a fine-tuning recipe on a validation split of one training draw (`finetune-select`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from probekit.errors import ProbekitError
from probekit.finetune import Recipe
from probekit.finetune.select import select_recipe, validation_split

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_validation_split_is_a_seeded_partition_of_the_draw():
    rows = np.arange(100, 260, 3)
    fit, val = validation_split(rows, 0.2, seed=11)
    assert len(val) == round(0.2 * len(rows)) and len(fit) + len(val) == len(rows)
    assert np.array_equal(np.sort(np.concatenate([fit, val])), np.arange(len(rows)))  # positions into rows
    again = validation_split(rows, 0.2, seed=11)
    assert np.array_equal(again[1], val) and not np.array_equal(validation_split(rows, 0.2, seed=12)[1], val)
    with pytest.raises(ProbekitError, match="leaves no training or no validation"):
        validation_split(rows[:2], 0.1, seed=0)


@pytest.mark.parametrize("args, message", [
    (["--validation", "1.5"], "validation fraction 1.5"),
    (["--lr", "0,1e-3"], "each positive"),
    (["--updates", "0,5"], "each at least 1"),
    (["--lr", "fast"], "--lr must be comma-separated numbers"),
])
def test_bad_search_settings_fail_in_one_line_before_the_model_loads(tmp_path, args, message):
    from probekit.cli import app

    out = tmp_path / "sel"
    result = CliRunner().invoke(app, ["finetune-select", str(tmp_path / "no-cache"), "--out", str(out),
                                      "--measure", "grade", *args])
    assert result.exit_code != 0
    text = result.output.strip()
    assert message in text and len(text.splitlines()) == 1 and "Traceback" not in text
    assert not out.exists()


@pytest.mark.slow
def test_selection_scores_only_the_draws_validation_items_and_checkpoints_equal_short_runs(lm, real_cache,
                                                                                          demo_items, tmp_path):
    from probekit.design import item_frame, load_items, open_cache, plan, tested_rows, zero_shot_p
    from probekit.store import Cache

    small = Recipe(max_batch=4, micro_batch=4, final_lr_fraction=1.0)
    common = dict(measure="grade", level="easy", draw=0, n_train=10, seed=3, validation=0.3, recipe=small)
    events = []
    a = select_recipe(real_cache, demo_items, tmp_path / "a", lm, lrs=[1e-3, 3e-3], updates=[1, 2], **common,
                      progress=lambda e, f: events.append(e))
    assert a["complete"] and a["split"] == {**a["split"], "train": 7, "validation": 3}
    assert events.count("run") == 2 and events.count("point") == 4  # one run per lr, scored along the way

    # the validation items are the head's own training items, never its test items
    frame_items, measures = load_items(open_cache(real_cache, False), ["grade"])
    frame = item_frame(frame_items, "bundled", measures, None)
    head = [h for h in plan(frame, "population", ["grade"], n_train=[10], label_noise=[0.0], draws=1, seed=3,
                            levels=["easy"])][0]
    ids = [str(i) for i in frame.ids]
    val = [ids.index(i) for i in a["split"]["validation_ids"]]
    assert set(val) <= set(head.rows.tolist()) and not set(val) & set(tested_rows(frame, head).tolist())

    # 0 updates is the base model: the cache's own zero-shot log-probs on those items
    cached, _ = Cache(real_cache).logprobs()
    p, correct = zero_shot_p(cached[val], frame.n_choices[val], frame.gold[val])
    assert a["zero_shot"]["accuracy"] == pytest.approx(correct.mean())
    assert a["zero_shot"]["nll"] == pytest.approx(float(-np.log(p.astype(np.float64)).mean()), abs=1e-4)

    # at a constant lr, the point after 1 update of a 2-update run is a 1-update run
    b = select_recipe(real_cache, demo_items, tmp_path / "b", lm, lrs=[1e-3], updates=[1], **common)
    one = {(q["lr"], q["updates"]): q for q in a["points"]}[(1e-3, 1)]
    assert b["points"][0] == pytest.approx(one, abs=1e-6)

    best = min(a["points"], key=lambda q: q["nll"])
    assert a["chosen"]["lr"] == best["lr"] and a["chosen"]["updates"] == best["updates"]
    assert f"--lr {best['lr']:g}" in a["chosen"]["finetune_options"]

    # a rerun keeps every finished run
    events.clear()
    again = select_recipe(real_cache, demo_items, tmp_path / "a", lm, lrs=[1e-3, 3e-3], updates=[1, 2], **common,
                          progress=lambda e, f: events.append(e))
    assert events.count("run") == 0 and again["points"] == a["points"] and again["chosen"] == a["chosen"]
    stored = json.loads((tmp_path / "a" / "selection.json").read_text())
    assert stored["points"] == a["points"]

    # a decaying lr trains every (lr, updates) pair on its own schedule
    events.clear()
    c = select_recipe(real_cache, demo_items, tmp_path / "c", lm, lrs=[1e-3], updates=[1, 2],
                      **{**common, "recipe": Recipe(max_batch=4, micro_batch=4)}, progress=lambda e, f: events.append(e))
    assert events.count("run") == 2 and not c["search"]["constant_lr"]
