"""The examples of docs/formats.md load through the real loaders (so the document stays true)."""

from __future__ import annotations

import re
from pathlib import Path

from tensorstage import api

DOC = Path(__file__).resolve().parents[1] / "docs" / "formats.md"


def _examples() -> dict[str, str]:
    blocks = re.findall(r"```yaml\n# file: (\S+)\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    return dict(blocks)


def test_every_example_loads(tmp_path: Path) -> None:
    ex = _examples()
    assert set(ex) == {"plan.yaml", "model.yaml", "system.yaml"}
    for name, text in ex.items():
        (tmp_path / name).write_text(text)
    plan = api.make_plan(tmp_path / "plan.yaml")
    assert (plan.tp, plan.pp, plan.dp, plan.vpp, plan.world) == (8, 4, 2, 2, 8 * 4 * 2)
    model = api.load_model(str(tmp_path / "model.yaml"))
    assert (model.name, model.num_layers, model.kv_heads) == ("my-8b", 32, 8)
    plan.validate_for(model)  # the documented plan fits the documented model
    system = api.load_system(tmp_path / "system.yaml")
    assert (system.name, system.gpus_per_node, system.num_gpus) == ("my-cluster", 4, 4)
