"""Communication replay on real processes, and network calibration from what was measured.

Why: the simulator's collective model is only as good as its alpha-beta numbers. This package
runs communication on real processes (``torch.distributed`` with gloo over TCP), optionally in
Linux network namespaces joined by shaped links (:mod:`~tensorstage.replay.netns`), records every
operation's start and end, compares with the simulator's model and with the model of the
algorithm that ran (:mod:`~tensorstage.replay.model`), and fits alpha-beta per link tier
(:mod:`~tensorstage.replay.fit`) into a system file (:mod:`~tensorstage.replay.calibrate`).

Modules: ``ops`` (per-rank op lists as plain data), ``worker`` (one rank), ``algorithms`` (the
simulator's collective algorithms on send/recv, which workers run by default), ``launch`` (start,
bound and stop R workers), ``netns`` (emulated links), ``microbench`` (the size sweep), ``model``
(predictions), ``fit`` (comparison and fit), ``bench`` (the sweep end to end), ``calibrate``
(system file), ``report`` (result.json, report.md, plot).
"""
