"""Speculation by cluster load (deployments/admission/speculation.py): the hysteresis rule
alone; the controller answering each replica report with the model's cap; the replica
handing a changed cap to its engine (and ignoring it when it does not speculate); the
settings and their command-line flags. No Ray: the controller's class is called
directly, the replica's methods run on a fake engine."""

from __future__ import annotations

import asyncio
import inspect
from types import SimpleNamespace

import pytest

from deployments.admission.controller import AdmissionController
from deployments.admission.ledger import Ask, Verdict
from deployments.admission.speculation import SpeculationSwitch
from deployments.app.config import AdmissionArgs, AppArgs, AppConfigError
from deployments.replica.deployment import EngineReplica

# ---- the rule ---------------------------------------------------------------------------


def states(switch: SpeculationSwitch, utilizations: list[float], model: str = "m"):
    """Whether ``model`` may speculate after each pool utilization (capacity 1000)."""
    out = []
    for u in utilizations:
        switch.update(model, round(u * 1000), 1000)
        out.append(switch.is_on(model))
    return out


def test_off_at_or_above_the_off_threshold_on_again_only_below_the_on_threshold():
    switch = SpeculationSwitch(off_utilization=0.85, on_utilization=0.6)
    assert switch.is_on("m") and switch.speculation_cap("m") is None  # on until told
    assert states(switch, [0.5, 0.84, 0.85]) == [True, True, False]
    assert switch.speculation_cap("m") == 0
    # between the thresholds it stays as it was: no flapping around one value
    assert states(switch, [0.84, 0.7, 0.6, 0.86, 0.61]) == [False] * 5
    assert states(switch, [0.59]) == [True]
    assert switch.speculation_cap("m") is None
    assert states(switch, [0.84, 0.61, 0.7]) == [True] * 3
    assert states(switch, [1.3]) == [False]  # leases grown past capacity: off


def test_update_says_when_the_switch_flipped():
    switch = SpeculationSwitch(0.8, 0.5)
    flips = [switch.update("m", used, 100) for used in (10, 80, 90, 40, 30, 95)]
    assert flips == [False, True, False, True, False, True]


def test_no_capacity_keeps_the_state_and_models_are_apart():
    switch = SpeculationSwitch(0.8, 0.5)
    switch.update("a", 90, 100)
    assert not switch.update("a", 0, 0)  # its replicas are gone or not yet reported
    assert not switch.is_on("a")
    assert not switch.update("b", 0, 0) and switch.is_on("b")
    switch.update("b", 10, 100)
    assert (switch.is_on("a"), switch.is_on("b")) == (False, True)


@pytest.mark.parametrize("off, on", [(0.6, 0.6), (0.5, 0.7), (0.8, -0.1)])
def test_thresholds_must_leave_a_band(off, on):
    with pytest.raises(ValueError, match="on_utilization"):
        SpeculationSwitch(off, on)


# ---- the controller: the cap rides the report's answer -------------------------------


def test_each_replica_report_is_answered_with_the_models_cap():
    async def go():
        controller = AdmissionController.func_or_class(
            {"heartbeat_s": 1.0, "speculation_off_utilization": 0.8,
             "speculation_on_utilization": 0.5})
        assert await controller.replica_report("m", "r1", 1000, []) is None
        assert await controller.replica_report("m", "r2", 1000, []) is None
        leases = [await controller.reserve("m", Ask(400), "ingress-1") for _ in range(4)]
        assert {d.verdict for d in leases} == {Verdict.ADMITTED}  # 1600 of 2000: 0.8
        assert await controller.replica_report("m", "r1", 1000, []) == 0  # off for all
        assert await controller.replica_report("m", "r2", 1000, []) == 0
        assert await controller.replica_report("other", "r3", 1000, []) is None
        assert (await controller.snapshot())["m"]["speculation"] is False
        await controller.release([leases[0].lease_id])  # 1200 of 2000: still off
        assert await controller.replica_report("m", "r1", 1000, []) == 0
        await controller.release([leases[1].lease_id])  # 800 of 2000: below 0.5
        assert await controller.replica_report("m", "r2", 1000, []) is None
        assert (await controller.snapshot())["m"]["speculation"] is True

    asyncio.run(go())


# ---- the replica: the engine hears a change, once ------------------------------------


class FakeEngine:
    def __init__(self, k: int | None):
        spec = SimpleNamespace(num_speculative_tokens=k) if k else None
        self.config = SimpleNamespace(speculative=spec)
        self.caps: list[int | None] = []

    def set_speculation_cap(self, cap: int | None) -> None:
        self.caps.append(cap)

    def shutdown(self, timeout: float) -> None:  # the replica's __del__
        pass


class FakeAdmission:
    """``replica_report.remote`` answers with the next cap of ``answers``."""

    def __init__(self, answers: list):
        self.answers = list(answers)
        self.replica_report = SimpleNamespace(remote=self._report)

    async def _report(self, *args):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def replica(k: int | None, answers: list, can_generate: bool = True) -> EngineReplica:
    r = EngineReplica.__new__(EngineReplica)  # the methods alone, without Serve
    r.args = SimpleNamespace(name="tiny")
    r.info = SimpleNamespace(can_generate=can_generate, capacity_tokens=1000)
    r.engine, r._admission = FakeEngine(k), FakeAdmission(answers)
    r.replica_id, r._active, r._speculation_cap = "r1", {}, None
    r.load = dict
    return r


def test_the_replica_hands_a_changed_cap_to_its_engine():
    r = replica(4, [None, 0, 0, ConnectionError("controller restarting"), 0, None, None])
    for _ in range(7):
        asyncio.run(r._report())
    assert r.engine.caps == [0, None]  # once off, once back on; a failed report keeps it
    assert r.max_num_spec_tokens() == 4


@pytest.mark.parametrize("k, can_generate", [(None, True), (4, False)])
def test_a_replica_that_does_not_speculate_ignores_the_cap(k, can_generate):
    r = replica(k, [0, None, 0], can_generate)
    for _ in range(3):
        asyncio.run(r._report())
    assert r.engine.caps == [] and r._speculation_cap is None
    assert r.max_num_spec_tokens() == 0


def test_the_engine_takes_the_cap_the_replica_hands_it():
    """The fake's method is the real engine's: ``Engine.set_speculation_cap(cap)``."""
    from worker import Engine

    params = list(inspect.signature(Engine.set_speculation_cap).parameters)
    assert params == ["self", "cap"]


# ---- the settings -----------------------------------------------------------------------


def test_the_settings_and_their_flags(capsys):
    import yaml

    from deployments.app.cli import main

    defaults = AdmissionArgs()
    assert (defaults.speculation_off_utilization, defaults.speculation_on_utilization) == (
        0.85, 0.6)
    assert main(["serve", "smoke:decoder", "--admission-speculation-off-utilization", "0.9",
                 "--admission-speculation-on-utilization", "0.7", "--dry-run"]) == 0
    (app,) = yaml.safe_load(capsys.readouterr().out)["applications"]
    assert app["args"]["admission"] == {"speculation_off_utilization": 0.9,
                                        "speculation_on_utilization": 0.7}
    with pytest.raises(AppConfigError, match=r"args\.admission: speculation_on_utilization "
                       r"\(0\.9\) must be < speculation_off_utilization \(0\.85\)"):
        AppArgs.parse({"models": [{"name": "m", "model": "smoke:decoder"}],
                       "admission": {"speculation_on_utilization": 0.9}})
