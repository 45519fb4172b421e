"""RECIPE lifelong editing: retrieval-augmented continuous prompts with a knowledge sentinel.

After Chen et al. 2024, "Lifelong Knowledge Editing for LLMs with Retrieval-Augmented Continuous Prompt
Learning" (reference code: qizhou000/RECIPE, `editors/recipe/recipe.py`, `editors/recipe/models.py`,
`train_recipe.py`; read, not copied). The LM is never changed; every edit becomes a short continuous
prompt that is put in front of the queries that retrieve it.

Pieces (trained once in `prepare`, frozen afterwards):
- a sentence encoder E (MiniLM-L6 by default; the reference fine-tunes RoBERTa-base) gives text features
  f(x) = [sentence embedding, mean, max, min of the token states] (4 × width), trained with the rest
  when `train_encoder` (reference);
- a knowledge head K and a query head Q map features to representations (`rep_dim`), each
  h(f) = W₁f + ReLU(W₂W₁f) (linear + residual ReLU layer, as in the reference);
- the knowledge sentinel s: `sentinel_tokens` learned token states run through the encoder's
  transformer layers (reference), whose knowledge representation K(f(s)) is row 0 of the knowledge base;
- the prompt generator P maps a knowledge representation r to `prompt_tokens` vectors of the LM's
  hidden size: P(r) = W₄(r + ReLU(W₃r)) reshaped to [prompt_tokens, hidden].
sim(q, k) = Q(f(q))·K(f(k)) / √rep_dim (`similarity=dot`, reference) or their cosine.

Editing (`inject`): encode the edit statement (`Knowledge.context`: "prompt target"), store K(f(k))
and P(K(f(k))). No gradient step. Answering (`answer` / `loglikelihood`): j* = argmax_j sim(q, k_j) over the
stored edits; if sim(q, k_j*) > sim(q, s) the prompt P_j* is spliced in after the start token through
`inputs_embeds`, otherwise the query goes through the untouched model's plain token path (bit-identical
outputs). The retrieval query q (`retrieval_query`) is, as in the reference's forward hook, the whole
text the LM's forward reads (`forward_input`): for a teacher-forced score that is prompt + target
without its last token, for generation the prompt; `prompt` retrieves on the prompt alone.

Training (`prepare`, on the task's held-out edits: prompt x, target y, rephrases x', locality prompts l
with their continuations; each training batch of B edits, statement k_i, p_i = P(K(f(k_i)))):
    L = λ_rel L_rel + λ_gen L_gen + λ_loc L_loc + λ_con (L_q2k + L_q2s + L_loc2s)
    L_rel   = − mean_t log p(y_t | BOS, p_i, x_i, y_<t)         over target tokens not yet won by margin
    L_gen   = the same for a random rephrase x'_i of edit i      (a token is "won" once p(y_t) ≥ h_e · max_other p)
    L_loc   = KL(p_LM(· | l_i) ‖ p(· | BOS, p_i, l_i)) on the locality continuation's positions
    L_q2k   = − log softmax_c(τ sim(q_i, c))[k_i],  c ∈ {s, k_1..k_M}: a query (prompt or rephrase at random)
              is pulled to its own statement, against the sentinel and the batch's statements
    L_q2s   = − log softmax_c(τ sim(q'_i, c))[s],   c ∈ {s} ∪ candidates without k_i: with its own
              knowledge absent, the other query must fall back to the sentinel
    L_loc2s = − log softmax_c(τ sim(l_i, c))[s],    c ∈ {s, k_1..k_M}: unrelated queries stay below the sentinel
The last two are hinged like the reference: only rows where p(s) < h_c · max_other p contribute. All
terms train everything (encoder, heads, sentinel, prompt generator) from the first step with one Adam
learning rate, as in the reference; `edit_gradients=prompt_generator`, `retrieval_epochs`,
`contrastive_negatives`, `standardise`, `head_init=shared_projection`, `sentinel=feature_vector` and a
frozen encoder are the earlier CPU-budget variant's knobs (docs/recipe.md lists each with its reference value).

Deviations that are not knobs: prompts are spliced after the start token (the reference prepends them
before it; Gemma needs BOS at position 0); the first feature is the encoder's sentence embedding (the
reference reads RoBERTa's pooler output).

The trained module (and the fine-tuned encoder) is saved as safetensors under
$KBENCH_CACHE/recipe/<hash>.safetensors, with the training curves beside it (<hash>.png, <hash>.json);
it is reused when the model, encoder, knobs and training data are identical (`cache`), or loaded from
`checkpoint`.

The package: `edits` (the training edits read from the edit contract), `module` (the trained nn.Module),
`training` (the objective and its loop), `storage` (the saved module), `curves` (training curves),
`method` (`Recipe`: retrieval and answering).
"""
from methods.recipe.curves import plot_curves
from methods.recipe.edits import TrainingEdit, training_edits
from methods.recipe.method import Recipe, is_reference_encoder
from methods.recipe.training import _TrainingData, hinged_nll

__all__ = ["Recipe", "TrainingEdit", "_TrainingData", "hinged_nll", "is_reference_encoder", "plot_curves",
           "training_edits"]
