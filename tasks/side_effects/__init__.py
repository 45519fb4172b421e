"""Side-effect probes of the synthetic and sequential tasks: `task.probes=[qa, near_miss, conflict, drift]`.

`qa` is the task's own questions (always on). The other families (definitions in metrics/side_effects.py,
guide in docs/side_effects.md):
- `near_miss`: after each context is injected, two questions per stated fact whose correct answer is
  *not* the injected one: the same relation about a never-injected subject of the same kind
  (`other_subject`), and a relation the generator never states about the injected subject
  (`other_relation`, `core.world.relations.NEAR_RELATIONS`). Seeded by the data seed and the context id; each probe's gold is a
  fresh generated value that never equals the injected answer, and `meta.injected` is the answer a leak
  would repeat. Metric: `near_miss/leak_rate`.
- `conflict` (task=sequential only): the last `conflict_updates` contexts of each sequence re-state every
  fact of the first ones with new values ("A later record corrects ..."). The updates' own questions are
  the originals' questions with the new gold; asked after the update is injected they give
  `conflict/update_acc`, `stale_rate` and `mixed_rate`.
- `drift`: a reference step before any injection (index 0) scores a fixed generic text
  (`loglikelihood_bare`: the weights as served, without the method's prompt augmentation, see
  `Method.loglikelihood_unaugmented`) and asks fixed unrelated questions through the method (teacher-forced and
  generated). Every step that injects asks them again: perplexity and next-token accuracy ratios after /
  before, and agreement with the answers before injection. The unrelated questions carry the step's
  injected contexts as their `Query.context` (what `method=context` shows), as the editing task does.

Layout: `drift_data` reads the drift family's text and questions; `probes` holds `SideEffectProbes`, which
adds the families' probe sets to a task's steps, scores them and aggregates their metrics. The probes
themselves are generated from the fictional world (`tasks.world.variants`).
"""
from tasks.side_effects.probes import SideEffectProbes

__all__ = ["SideEffectProbes"]
