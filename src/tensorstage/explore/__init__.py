"""Design-space exploration after COSMIC's parameter-set idea (see ``docs/architecture.md``).

A :class:`~.space.Space` (parameters by stack, derived values, constraints, objectives, budget)
is searched by an ask/tell agent (:mod:`.agents`); candidates are pre-screened in closed form
(:mod:`.fastpath`) and simulated in full (:mod:`.evaluate`) by an executor (:mod:`.executors`);
every trial lands in a SQLite store (:mod:`.study`) so a study resumes after an interruption;
:mod:`.outputs` writes the trial table, best plan, Pareto front and plots; :mod:`.bestplan`
searches training layouts for a model, system and GPU count.
"""
