"""The fictional world: a seeded generator of invented entities and their facts, importing no task.

- `vocab`: the name and value pools (`make_name`, `draw_value`, `draw_subject`);
- `relations`: the kinds of entity and their `Relation`s (`KINDS`), and the never-stated relations
  near-miss questions ask (`NEAR_RELATIONS`);
- `generate`: facts, context-QA items and their training pairs (`generate_items`, `qa_pairs`,
  `world_pairs`);
- `variants`: what the side-effect probes derive from a generated context: near-miss questions and
  updates that re-state its facts with new values.

Every function is deterministic in its seed: the same arguments give the same world, so a record's
config names its data exactly. Names are built from random syllables, so no model can know them.
"""
