"""``dflare evaluate``: a trained draft's held-out accuracy and acceptance, per answer source."""

import json

import pytest

from modeling_dflare.training.evaluate import evaluate_draft


def test_evaluate_reports_what_the_training_run_measured(trained_draft):
    """`dflare evaluate` on the run's own held-out answers gives the run's last curve point (acc@1,
    implied and walked τ: same anchors, same walk), and τ measured in generate on request."""
    draft, target, tokenizer, heldout = trained_draft
    last = json.loads((draft / "training_summary.json").read_text())["curve"][-1]
    reports = evaluate_draft(draft, str(heldout), target=target, tokenizer=tokenizer, max_length=512, generate_prompts=2)
    report = reports[str(heldout)]
    assert report["answers"] == 4
    assert report["acc1"] == pytest.approx(last["acc"][0], abs=0.02)
    assert report["implied_tau"] == pytest.approx(last["tau"], abs=0.05)
    assert report["walk_tau"] == pytest.approx(last["walk_tau"], abs=0.05)
    assert report["generate_prompts"] == 2 and report["generate_tau"] >= 1.0


def test_evaluate_names_a_missing_folder(trained_draft):
    draft, target, tokenizer, heldout = trained_draft
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        evaluate_draft(draft, f"{heldout},no-such-folder", target=target, tokenizer=tokenizer)
