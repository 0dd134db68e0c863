"""The conditional-disaggregation rule: local prefill for short uncached suffixes, guarded by decode slack."""

import pytest

from pdserve.router.pd_decision import PDRule


def test_default_always_disaggregates() -> None:
    d = PDRule().decide(uncached_tokens=3, prefill_queue_tokens=0, decode_slack_tokens=512)
    assert (d.local, d.reason) == (False, "disabled")


@pytest.mark.parametrize("uncached, queue, slack, local, reason", [
    (64, 0, 512, True, "short"),  # a short suffix (e.g. the new message of a cached chat)
    (65, 0, 512, False, "long"),
    (64, 0, 0, False, "no_decode_slack"),  # the decode instance has no room this step
    (900, 5000, 512, True, "prefill_saturated"),  # long, but the prefill pool is saturated
    (900, 100, 512, False, "long"),
])
def test_threshold_queue_and_slack(uncached: int, queue: int, slack: int, local: bool, reason: str) -> None:
    d = PDRule(threshold_tokens=64, prefill_queue_limit=4096).decide(uncached, queue, slack)
    assert (d.local, d.reason) == (local, reason)
    assert (d.uncached_tokens, d.prefill_queue_tokens, d.decode_slack_tokens) == (uncached, queue, slack)


def test_bad_rule_names_the_field() -> None:
    with pytest.raises(ValueError, match="pd_threshold_tokens"):
        PDRule(threshold_tokens=-1)
