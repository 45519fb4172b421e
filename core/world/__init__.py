"""The fictional world's vocabulary, relations and training-pair question forms: data the synthetic tasks
generate from and the sentence sources render pairs with (`core.world.pairs`), importing nothing above core.

- `vocab`: the name and value pools (`make_name`, `draw_value`, `draw_subject`);
- `relations`: the kinds of entity and their `Relation`s (`KINDS`), and the never-stated relations
  near-miss questions ask (`NEAR_RELATIONS`);
- `pairs`: a context's unique training pairs (`qa_pairs`, `world_pairs`).

The generator of contexts and items, and the side-effect variants, live with the tasks (`tasks/world/`).
"""
