"""The evaluation report: `eval.json` (every number and sample), `report.html` and its PNG plots.

    write_report(result, "runs/quickstart/eval", info={...}, metrics=read_metrics("runs/quickstart/metrics.jsonl"))

The folder holds:

| file | what |
|---|---|
| `eval.json` | the run information, the summary numbers of policy and reference, KL, win rate, every sample |
| `report.html` | a summary table (policy vs reference), the plots, and a table of sample responses before/after |
| `reward_kl_over_iterations.png` | training reward and KL per iteration (from the run's metrics.jsonl) |
| `reward_vs_kl.png` | training reward against KL per iteration, with the held-out evaluation marked |
| `length.png` | histogram of response lengths, policy vs reference |

The two training plots need the run's metrics.jsonl; for a bare policy folder they are left out and
the page says why. The folder is written beside its destination and renamed into place, so a report
is never half-written, and a previous one is replaced whole.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlhf_ray.evaluation.evaluate import EvalResult

REWARD_KL_PLOT = "reward_kl_over_iterations.png"
REWARD_VS_KL_PLOT = "reward_vs_kl.png"
LENGTH_PLOT = "length.png"
REWARD_KEY, KL_KEY = "rollout/reward_mean", "objective/kl"  # the names training logs (learner/ppo.py)

# rows of the summary table: (key in EvalResult.policy/.reference, label, format)
SUMMARY_ROWS = [("reward", "reward (mean)", "{:+.4f}"), ("length", "response length (tokens)", "{:.2f}"),
                ("eos_frac", "ended with EOS", "{:.1%}"), ("bleu", "BLEU", "{:.2f}"),
                ("rouge1", "ROUGE-1 F", "{:.4f}"), ("rouge2", "ROUGE-2 F", "{:.4f}"), ("rougeL", "ROUGE-L F", "{:.4f}")]


class MetricsError(ValueError):
    """A metrics.jsonl that cannot be plotted; the message names file and line."""


def read_metrics(path: str | Path) -> list[dict]:
    """The per-iteration rows of a run's metrics.jsonl, in iteration order; the last row of an iteration
    wins (a resumed run may have logged one twice)."""
    path = Path(path)
    rows: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise MetricsError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
            raise MetricsError(f"{path}:{number}: expected a JSON object with an integer 'iteration'")
        rows[row["iteration"]] = row
    return [rows[iteration] for iteration in sorted(rows)]


def _series(metrics: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """The iterations that logged `key` and its values there."""
    pairs = [(row["iteration"], float(row[key])) for row in metrics if isinstance(row.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_reward_kl_over_iterations(metrics: Sequence[dict], path: Path) -> None:
    """Two panels over iterations: the training reward (and each reward/<name> component), and the KL."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    reward_axes, kl_axes = figure.subplots(1, 2)
    reward_axes.plot(*_series(metrics, REWARD_KEY), marker=".", label="reward")
    components = sorted({key for row in metrics for key in row if key.startswith("reward/")})
    for key in components:
        reward_axes.plot(*_series(metrics, key), linestyle="--", label=key)
    reward_axes.set(title="training reward", xlabel="iteration", ylabel=REWARD_KEY)
    if components:
        reward_axes.legend(fontsize="small")
    kl_axes.plot(*_series(metrics, KL_KEY), marker=".", color="tab:red")
    kl_axes.set(title="KL to the reference", xlabel="iteration", ylabel=f"{KL_KEY} (nats per sequence)")
    _integer_ticks(reward_axes)
    _integer_ticks(kl_axes)
    figure.savefig(path, dpi=100)


def plot_reward_vs_kl(metrics: Sequence[dict], result: EvalResult, path: Path) -> None:
    """Training reward against KL, one point per iteration coloured by iteration; the held-out policy and
    reference marked (the reference sits at KL 0)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.2), layout="constrained")
    axes = figure.subplots()
    kl = {row["iteration"]: row[KL_KEY] for row in metrics if KL_KEY in row}
    iterations = [row["iteration"] for row in metrics if REWARD_KEY in row and row["iteration"] in kl]
    rewards = [row[REWARD_KEY] for row in metrics if REWARD_KEY in row and row["iteration"] in kl]
    points = axes.scatter([kl[i] for i in iterations], rewards, c=iterations, cmap="viridis", s=18,
                          label="training iterations")
    figure.colorbar(points, ax=axes, label="iteration")
    axes.scatter([result.kl], [result.policy["reward"]], marker="*", s=160, color="tab:red",
                 label="policy, held-out")
    axes.scatter([0.0], [result.reference["reward"]], marker="s", s=60, color="tab:gray",
                 label="reference, held-out")
    axes.set(title="reward against KL", xlabel="KL to the reference (nats per sequence)", ylabel="reward")
    axes.legend(fontsize="small")
    figure.savefig(path, dpi=100)


def plot_lengths(result: EvalResult, path: Path) -> None:
    """Histogram of response lengths in tokens, policy against reference, on shared integer bins."""
    from matplotlib.figure import Figure

    policy = [s.policy_length for s in result.samples]
    reference = [s.reference_length for s in result.samples]
    bins = np.arange(min(policy + reference), max(policy + reference) + 2) - 0.5  # one bin per length
    figure = Figure(figsize=(5.5, 3.6), layout="constrained")
    axes = figure.subplots()
    axes.hist([reference, policy], bins=bins, label=["reference", "policy"], color=["tab:gray", "tab:blue"])
    axes.set(title="response length", xlabel="tokens (EOS included)", ylabel="responses")
    _integer_ticks(axes)
    axes.legend()
    figure.savefig(path, dpi=100)


def _integer_ticks(axes) -> None:
    """Whole numbers on the x axis (iterations, token counts), not 1.25, 1.5, ..."""
    from matplotlib.ticker import MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(integer=True))


def _number(value: float | None, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def summary_rows(result: EvalResult) -> list[tuple[str, str, str]]:
    """(label, policy, reference) rows of the summary, formatted: what the page and the command line show."""
    rows = [(label, _number(result.policy.get(key), fmt), _number(result.reference.get(key), fmt))
            for key, label, fmt in SUMMARY_ROWS if key in result.policy]
    components = [key for key in result.policy if key.startswith("reward/")]
    rows[1:1] = [(key, f"{result.policy[key]:+.4f}", f"{result.reference[key]:+.4f}") for key in components]
    rows.append(("KL(policy || reference), nats", f"{result.kl:.4f}", ""))
    rows.append(("win rate vs reference", f"{result.win_rate:.1%}", ""))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], css_class: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def readable(text: str) -> str:
    """A conversation as people read it (a dialogue's response, a chat-formatted prompt): one "[role]" line per
    turn instead of the chat template's marks (ChatML's and the task tokenizer's); other text as it is. The
    feedback pages show answers the same way (`readable` in serve/pages/ui.js)."""
    text = re.sub(r"<\|im_start\|>(\w+)\n", r"\n[\1] ", text)
    text = re.sub(r"\s*<\|(system|user|assistant|tool)\|>\s*", r"\n[\1] ", text)
    text = re.sub(r"\s*(<\|im_end\|>|<\|end\|>)\s*", "\n", text)
    return re.sub(r"\n{2,}", "\n", text).strip()


def samples_table(result: EvalResult, count: int) -> str:
    """The first `count` prompts with the reference's response (before) and the policy's (after)."""
    has_targets = any(s.target is not None for s in result.samples)
    header = ["prompt"] + (["dataset response"] if has_targets else []) + [
        "before (reference)", "reward", "after (policy)", "reward", "KL"]
    rows = [[readable(s.prompt_text)] + ([s.target or ""] if has_targets else []) + [
        readable(s.reference_response), f"{s.reference_reward:+.3f}", readable(s.policy_response),
        f"{s.policy_reward:+.3f}", f"{s.kl:.3f}"] for s in result.samples[:count]]
    return _table(header, rows, "samples")


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}table.summary td:not(:first-child){text-align:right;font-family:monospace}
table.samples td{white-space:pre-wrap}.note{color:#a60}img{max-width:100%;margin:0.5em 0}"""


def _info_text(value) -> str:
    """A value of the run information as a reader wants it: `a=1, b=2` for a mapping."""
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return str(value)


PLOT_CAPTION = ("Training points are the run's per-iteration rollout/reward_mean (after reward_scale and any "
                "missing-EOS penalty) and objective/kl; the held-out marks are this evaluation's mean reward "
                "and KL.")


def human_section(human: dict | None) -> str:
    """The blind study's results (`FeedbackStore.study_results`) beside the automatic measures."""
    if not human:
        return ""
    models, rate = human["models"], human["win_rate"]
    head = (f"<h2>Human evaluation</h2>\n<p>Blind study <b>{html.escape(human['study'])}</b>: "
            f"{html.escape(str(models.get('a', 'a')))} (a) against {html.escape(str(models.get('b', 'b')))} (b), "
            f"{human['labels']} judgements of {human['items']} items"
            + ("" if human["complete"] else " (not complete)") + ".</p>\n")
    if rate is None:
        return head + "<p>No judgements yet.</p>\n"
    rows = [("human win rate of a (ties count 1/2)", f"{rate['rate']:.1%}"),
            ("95% Wilson interval", f"{rate['low']:.1%} to {rate['high']:.1%}"),
            ("wins / losses / ties", f"{rate['wins']} / {rate['losses']} / {rate['ties']}")]
    rows += [(f"annotator {name}", f"{c['win']} / {c['loss']} / {c['tie']}") for name, c in human["per_annotator"].items()]
    rows += [(f"Cohen's kappa, {' & '.join(g['annotators'])} ({g['items']} shared items)",
              "undefined" if g["kappa"] is None else f"{g['kappa']:.3f}") for g in human["agreement"]]
    return head + _table(["", ""], rows, "summary") + "\n"


def render_html(result: EvalResult, info: dict, plots: Sequence[str], notes: Sequence[str], samples: int,
                human: dict | None = None) -> str:
    """The report page: run information, summary table, the human study if any, plots (files beside it),
    sample responses."""
    details = "".join(f"<li><b>{html.escape(str(key))}</b>: {html.escape(_info_text(value))}</li>"
                      for key, value in info.items())
    images = "".join(f'<img src="{html.escape(name)}" alt="{html.escape(name)}">' for name in plots)
    remarks = "".join(f'<p class="note">{html.escape(note)}</p>' for note in notes)
    title = f"Evaluation of {info.get('policy', 'the policy')}"
    caption = f"<p>{html.escape(PLOT_CAPTION)}</p>\n" if REWARD_VS_KL_PLOT in plots else ""
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<ul>{details}</ul>\n"
            f"<h2>Summary</h2>\n{_table(['', 'policy', 'reference'], summary_rows(result), 'summary')}\n"
            f"{human_section(human)}"
            f"<h2>Plots</h2>\n{remarks}{images}\n{caption}"
            f"<h2>Sample responses</h2>\n<p>The first {min(samples, len(result.samples))} of "
            f"{len(result.samples)} held-out prompts; all are in eval.json.</p>\n"
            f"{samples_table(result, samples)}\n</body></html>\n")


def _write_folder(folder: Path, result: EvalResult, info: dict, metrics: Sequence[dict] | None,
                  metrics_note: str | None, samples: int, human: dict | None) -> None:
    plots, notes = [], []
    if metrics:
        plot_reward_kl_over_iterations(metrics, folder / REWARD_KL_PLOT)
        plot_reward_vs_kl(metrics, result, folder / REWARD_VS_KL_PLOT)
        plots += [REWARD_KL_PLOT, REWARD_VS_KL_PLOT]
    else:
        notes.append(metrics_note or "No training metrics (metrics.jsonl): the reward/KL-over-iterations "
                                     "plots are left out.")
    plot_lengths(result, folder / LENGTH_PLOT)
    plots.append(LENGTH_PLOT)
    extra = {"human": human} if human else {}
    (folder / "eval.json").write_text(json.dumps({"info": info, **result.to_dict(), **extra}, indent=2) + "\n")
    (folder / "report.html").write_text(render_html(result, info, plots, notes, samples, human))


def write_report(result: EvalResult, out_dir: str | Path, info: dict, metrics: Sequence[dict] | None = None,
                 metrics_note: str | None = None, samples: int = 8, human: dict | None = None) -> Path:
    """Write eval.json, report.html and the plots into `out_dir` (replacing a previous report); the html path.

    `info`: what was evaluated (policy, reference, prompts, seed, ...), shown at the top of the page;
    `metrics`: the run's per-iteration rows for the training plots, None for a bare policy;
    `metrics_note`: why they are missing, shown instead of the plots;
    `human`: a blind study's results (`FeedbackStore.study_results`), in eval.json as "human" and on the page.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-writing-", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the report is an ordinary folder
    try:
        _write_folder(staging, result, info, metrics, metrics_note, samples, human)
        if out_dir.exists():
            # move the old report aside first: a rename cannot replace a non-empty folder
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-old-", dir=out_dir.parent))
            out_dir.rename(old / out_dir.name)
            staging.rename(out_dir)
            shutil.rmtree(old)
        else:
            staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir / "report.html"
