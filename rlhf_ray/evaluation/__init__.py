"""Evaluation of a trained policy against its reference on held-out prompts (`rlhf-ray eval`).

    from rlhf_ray.evaluation.evaluate import evaluate
    from rlhf_ray.evaluation.report import write_report
    result = evaluate(policy, reference, tokenizer, prompts, reward_fn, params=params, targets=responses)
    write_report(result, "runs/quickstart/eval", info={"policy": "runs/quickstart/policy"})

`evaluate` (no Ray) samples both models with the same seeds and measures reward, KL, win rate, length
and BLEU/ROUGE; `write_report` writes eval.json, report.html and its PNG plots; `add_eval_commands`
adds the command to the `rlhf-ray` parser.

Names are imported on first use, so adding the command to the parser does not import torch. The
function `evaluate` is imported from its module, `rlhf_ray.evaluation.evaluate`, whose name it shares.
"""

from rlhf_ray.lazy import lazy_exports

_EXPORTS = {
    "add_eval_commands": "cli", "EvalResult": "evaluate", "Sample": "evaluate",
    "text_overlap": "evaluate", "read_metrics": "report", "write_report": "report",
}
__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
