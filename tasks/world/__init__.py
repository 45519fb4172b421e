"""The fictional world's contexts and their variants, built on `core.world` (vocabulary, relations,
training pairs), importing no task.

- `generate`: context-QA items (`generate_items`) and the facts a generated context states (`facts_of`);
- `variants`: what the side-effect probes derive from a generated context: near-miss questions and
  updates that re-state its facts with new values.

Every function is deterministic in its seed: the same arguments give the same world, so a record's
config names its data exactly. Names are built from random syllables, so no model can know them.
"""
