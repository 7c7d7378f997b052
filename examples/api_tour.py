"""A tour of the tensorstage Python API, notebook style: run it top to bottom (a test does).

    python examples/api_tour.py [OUTPUT_DIR]

Each block is what one CLI command does; every function returns a typed result rather than
printing, so the numbers can be compared, plotted or searched over directly.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from tensorstage import api

# 1. The default plan every command uses, and a variation of it. Overrides replace only the
#    keys they name; kept defaults that change a derived number are reported in `notes`.
print(api.describe_plan(api.DEFAULT_PLAN))
choice = api.choose_plan(tp=1, pp=2, dp=2, seq=512, global_batch=8)
plan = choice.plan
print(api.describe_plan(plan))
for note in choice.notes:
    print("note:", note)

# 2. A model: preset name, HF config.json or model YAML -> ModelSpec.
model = api.load_model("gpt3-125m")
print(f"{model.name}: {model.num_layers} layers, hidden {model.hidden}")

# 3. Lowering: one Program per pipeline stage (rank class).
lowered = api.lower(model, plan)
print(f"{len(lowered.programs)} rank classes, {lowered.tokens_per_step:,} tokens per step")

# 4. Simulate one training step on a system sized to the plan.
sim = api.simulate(model, "dgx-a100-selene", plan)
res = sim.result
print(f"step {res.step_time_s:.4f} s, MFU {res.mfu:.1%}, peak memory {res.peak_memory_bytes / 2**30:.2f} GiB "
      f"on {res.world} GPUs")

# 5. Chakra ET traces of the same step, then simulate them back: the same step time.
out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "traces"
gen = api.generate(model, plan, out)
print(f"{gen.files} trace files ({gen.bytes:,} bytes) for {gen.world} ranks in {gen.out}")
back = api.simulate_trace(out, "dgx-a100-selene")
print(f"from the traces: step {back.result.step_time_s:.4f} s")
assert abs(back.result.step_time_s - res.step_time_s) <= 1e-9 * res.step_time_s

# 6. `api.validate()` predicts every published case (about 90 s); `api.run(...)` is `tensorstage run`.
