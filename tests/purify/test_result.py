"""PurifyResult: what the purification still suspects decides ``guard purify``'s exit code."""

from guard.purify.result import STILL_SUCCEEDS, PurifyResult


def _result(ok: bool = True, **after) -> PurifyResult:
    side = {"clean_accuracy": 0.95, "attack_success": 0.02, "attack_success_anywhere": 0.03, "verdict": None,
            "suspect_labels": None}
    return PurifyResult("auto", ok, side | {"attack_success": 0.99}, side | after, {} if ok else None, {})


def test_a_repair_that_moved_the_triggers_and_was_not_rescanned_is_not_suspected():
    assert _result().suspicions() == []
    assert _result(verdict="clean", suspect_labels=[]).suspicions() == []


def test_the_reversed_triggers_still_succeeding_keep_the_model_suspected_without_a_rescan():
    """The gap a --no-rescan run fell through: the rescan did not run, and the triggers the repair was shown
    still reach their label."""
    why = _result(attack_success=0.97).suspicions()
    assert len(why) == 1 and "97.0%" in why[0] and "where they were found" in why[0]
    why = _result(attack_success_anywhere=STILL_SUCCEEDS).suspicions()
    assert len(why) == 1 and "pasted anywhere" in why[0]
    assert _result(attack_success=STILL_SUCCEEDS - 0.01).suspicions() == []


def test_the_rescan_verdict_and_the_triggers_add_up():
    why = _result(verdict="backdoored", suspect_labels=[6], attack_success=0.8).suspicions()
    assert len(why) == 2 and "[6]" in why[0]
    # the triggers' success alone keeps it suspected even when the rescan says clean
    assert len(_result(verdict="clean", suspect_labels=[], attack_success=0.6).suspicions()) == 1


def test_a_refused_purification_has_nothing_to_suspect():
    """Nothing was kept, so nothing is written; the refusal (exit 1) speaks for it."""
    assert _result(ok=False, attack_success=None, attack_success_anywhere=None).suspicions() == []
