"""The fault-injection campaign (tests/chaos.py), a few seeded trials per fault: kill -9 of a rank, a
preemption signal, the disk filling during a save, a tampered checkpoint. Each trial must resume to the
uninterrupted run's losses with no step lost or repeated. SEGCAP_CHAOS_TRIALS sets the trials per fault."""

import json
import os
from dataclasses import asdict

import pytest

from tests.chaos import FAULTS, Campaign, markdown, summarize

pytestmark = [pytest.mark.chaos, pytest.mark.dist, pytest.mark.slow]
TRIALS = int(os.environ.get("SEGCAP_CHAOS_TRIALS", "1"))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    return Campaign(tmp_path_factory.mktemp("chaos"), seed=int(os.environ.get("SEGCAP_CHAOS_SEED", "0")))


@pytest.mark.timeout(600 + 600 * TRIALS)  # 2-3 runs per trial, each minutes on a loaded 2-core machine
@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_survived_with_equal_losses(campaign, fault):
    if fault == "disk" and os.geteuid() != 0:
        pytest.fail("the disk fault mounts a tmpfs: run as root (CI does)")
    trials = [campaign.trial(fault, i) for i in range(TRIALS)]
    print(markdown(summarize(trials)))
    for t in trials:
        assert t.ok, json.dumps(asdict(t), indent=1)
        if fault != "signal":  # (a signal during the last step lets the run finish: checked in the trial)
            assert t.submits >= 2 or t.landed == "after the run", t  # the fault stopped the first submission
