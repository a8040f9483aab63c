"""Is the tuned model worse than the base, or collapsed? What training publishes says so.

A run whose learning rate destroyed the model still ends with finite numbers: the loss of a
model that predicts one token everywhere, or the uniform ln(K) of one whose logits are all
equal. Two findings are reported, in the final table and in eval.json's `verdict`:

- worse than the base: the tuned held-out loss is above the base's (relative tolerance 1e-4,
  so evaluation noise of an unchanged model is not a finding). Needs a 'base' row.
- collapsed: the tuned loss is within 1% of ln(K) (K classes or vocabulary entries: a uniform
  guess) while the base's was clearly below it (under 0.95 ln K), so the tuning lost what the
  base knew; or the tuned model is worse than the base and its argmax prediction is the same
  class or token at every scored held-out position while the gold labels take at least two
  values. (A constant prediction alone is no finding: on data whose tokens are equally likely,
  or with a dominant class, it is what the best model does.)
"""

from __future__ import annotations

import math

WORSE_TOLERANCE = 1e-4
UNIFORM_TOLERANCE = 0.01


def judge(rows: dict[str, dict[str, float]], tuned: dict) -> dict:
    """The verdict on the tuned row: `worse_than_base`, `collapsed` and one warning per finding.

    `rows`: `compare_with_base`'s metrics; `tuned`: the tuned row's diagnostics."""
    warnings = []
    loss = rows["tuned"]["loss"]
    base = rows.get("base", {}).get("loss")
    worse = base is not None and loss > base * (1 + WORSE_TOLERANCE)
    if worse:
        warnings.append(f"the tuned model is worse than the base on the held-out set (loss {loss:.4f} against {base:.4f})")
    collapsed = False
    predictions, labels = tuned.get("predictions", []), tuned.get("labels", [])
    if worse and len(predictions) == 1 and len(labels) >= 2:
        collapsed = True
        warnings.append(f"the tuned model's outputs collapsed: it predicts {predictions[0]} at every held-out position")
    outputs = tuned.get("outputs")
    if outputs and outputs > 1:
        uniform = math.log(outputs)
        if abs(loss - uniform) <= UNIFORM_TOLERANCE * uniform and (base is None or base < 0.95 * uniform):
            collapsed = True
            warnings.append(f"the tuned model's outputs collapsed: its loss {loss:.4f} is a uniform guess over {outputs} outputs (ln {outputs} = {uniform:.4f})")
    if warnings:
        warnings.append("the adapter was published for inspection; lower training.learning_rate (or set training.max_grad_norm) and train again")
    return {"worse_than_base": worse, "collapsed": collapsed, "warnings": warnings}
