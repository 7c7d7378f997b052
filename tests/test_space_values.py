"""A space's parameter values are checked when the file is parsed (one line naming the parameter),
and a plug-in agent that is not an agent class is one line too."""

from __future__ import annotations

import pytest

from tensorstage.errors import SpecError
from tensorstage.explore.agents import make_agent
from tensorstage.explore.space import parse_space

BASE = {"model": "megatron-1.7b", "system": "dgx-a100-selene", "gpus": 16,
        "fixed": {"seq": 2048, "global_batch": 64}, "derived": {"dp": "gpus"}, "budget": 2}


@pytest.mark.parametrize("params, field, words", [
    ({"plan": {"recompute": ["none", "ful"]}}, "space.parameters.plan.recompute", "allowed"),
    ({"plan": {"zero": [0, 4]}}, "space.parameters.plan.zero", "got 4"),
    ({"collective": {"cp_mode": ["ring", "alltoall"]}}, "space.parameters.collective.cp_mode", "alltoall"),
    ({"hardware": {"device": ["A100-80GB", "H100-SMX"]}}, "space.parameters.hardware.device", "H100-SXM"),
    ({"network": {"ib.bandwidth_GBps": [-5, 25]}}, "space.parameters.network.ib.bandwidth_GBps", "> 0"),
    ({"network": {"ib.topology": ["Switch", "Ring2"]}}, "space.parameters.network.ib.topology", "Ring2"),
])
def test_bad_parameter_values_are_one_line(params, field, words):
    with pytest.raises(SpecError) as err:
        parse_space({**BASE, "parameters": params})
    assert err.value.field == field and words in str(err.value), str(err.value)


def test_good_values_still_parse():
    sp = parse_space({**BASE, "parameters": {"plan": {"recompute": ["none", "full"], "zero": [0, 1, 3]},
                                            "network": {"ib.bandwidth_GBps": {"float": [12.5, 50], "steps": 3}},
                                            "hardware": {"device": ["A100-80GB", "H100-SXM"]}}})
    assert sp.grid_size == 2 * 3 * 3 * 2


@pytest.mark.parametrize("name, words", [
    ("os:path", "is a module"),
    ("os:getcwd", "cannot be built"),
    ("collections:OrderedDict", "cannot be built"),
    ("types:SimpleNamespace", "cannot be built"),
])
def test_a_plug_in_that_is_not_an_agent_is_one_line(name, words):
    sp = parse_space({**BASE, "parameters": {"plan": {"recompute": ["none", "full"]}}})
    with pytest.raises(SpecError) as err:
        make_agent(name, sp)
    assert err.value.field == "agent" and words in str(err.value), str(err.value)


def test_a_plug_in_without_ask_and_tell_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "myagent.py").write_text("class Lazy:\n    def __init__(self, space, seed, n):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sp = parse_space({**BASE, "parameters": {"plan": {"recompute": ["none", "full"]}}})
    with pytest.raises(SpecError) as err:
        make_agent("myagent:Lazy", sp)
    assert "no ask or tell" in str(err.value)


def test_a_searched_system_says_which_numbers_the_search_set():
    from tensorstage.explore.setup import build_system

    s = build_system("dgx-a100-selene", 64, (("ib", "bandwidth_GBps", 100.0), ("nvlink", "npus", 4)))
    assert s.network[1].bandwidth_GBps == 100.0 and s.gpus_per_node == 4
    for key in ("network.ib.bandwidth_GBps", "network.nvlink.npus", "gpus_per_node"):
        assert "design-space search" in s.sources[key], key
    assert "changed by the design-space search" in s.sources["scaleout.nic_Gbps"]
    untouched = build_system("dgx-a100-selene", 64)
    assert not any("design-space search" in v for v in untouched.sources.values())


def test_a_derived_value_that_reads_itself_is_an_error():
    with pytest.raises(SpecError) as err:
        parse_space({**BASE, "parameters": {"plan": {"tp": [1, 2]}}, "derived": {"dp": "gpus // (tp * dp)"}})
    assert err.value.field == "space.derived.dp" and "itself" in str(err.value)


def test_an_error_inside_a_plug_in_is_its_own(tmp_path, monkeypatch):
    """A plug-in with the right signature whose __init__ fails shows its own error, not 'cannot be built'."""
    (tmp_path / "badagent.py").write_text("class Broken:\n    def __init__(self, space, seed, n):\n"
                                          "        raise TypeError('my bug')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sp = parse_space({**BASE, "parameters": {"plan": {"recompute": ["none", "full"]}}})
    with pytest.raises(TypeError, match="my bug"):
        make_agent("badagent:Broken", sp)
