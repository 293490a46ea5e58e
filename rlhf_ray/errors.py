"""Which failures end a run at once, decided by exception type, in this one place.

Ray Train's `FailureConfig` restarts the learner after any worker error, and Ray restarts actors after
any death: right for a killed process or a lost node, wrong for the user's own code, data and config,
which fail the same way every time. Retrying those costs minutes and buries the user's message under
tracebacks ("the run stalled", "one bad actor killed the run").

    RunStopped          the run ends now, without a retry: retrying cannot help
      UserError         the user's reward function, dataset, model path or config is wrong
                        (RewardError, TaskError, DataError, ConfigError, PreflightError derive from it)
      (others)          a bounded wait ran out (`WaitTimeout`), a bounded retry budget was spent

Everything else (a lost actor, a dead node, an OOM kill) is a fault and keeps being retried. The
pool and the learner loop ask `stop_reason(err)`, which looks through Ray's wrappers (a task error
carries the remote exception as `cause`, Ray Train's `WorkerGroupError` the ranks' errors) and
through `__cause__` chains. No Ray import here: the envs and the reward adapters raise these too.
"""

from __future__ import annotations


class RunStopped(Exception):
    """A failure that ends the run without a retry; its message is the one line the user sees."""


class UserError(RunStopped):
    """The user's code, data or configuration is wrong: the same call fails the same way every time."""


class RewardError(UserError, ValueError):
    """A reward function that cannot be built, or that returned something other than one finite score per item.

    Here rather than in `rewards/base.py`, so the reward adapters (`rewards/reward_model.py`) raise it
    without importing the module that dispatches to them.
    """


class TaskError(UserError, ValueError):
    """A multi-turn task (`envs.dialogue`: its user or tool) that cannot be loaded, raised, or answered with
    something other than a `Reply` or None; the message names the task."""


class WaitTimeout(RunStopped, TimeoutError):
    """A bounded wait ran out; the message names what was waited for and who did not answer."""


def _inner(err: BaseException) -> list[BaseException]:
    """The exceptions `err` wraps: Ray's task-error cause, Ray Train's per-rank and controller errors,
    and the explicit `raise ... from` chain."""
    inner = []
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, BaseException):
        inner.append(cause)
    failures = getattr(err, "worker_failures", None)  # ray.train.WorkerGroupError: {rank: exception}
    if isinstance(failures, dict):
        inner.extend(e for _, e in sorted(failures.items()) if isinstance(e, BaseException))
    controller = getattr(err, "controller_failure", None)  # ray.train.ControllerError
    if isinstance(controller, BaseException):
        inner.append(controller)
    if err.__cause__ is not None:
        inner.append(err.__cause__)
    return inner


def stop_reason(err: BaseException | None, _depth: int = 0) -> RunStopped | None:
    """The `RunStopped` behind `err` (itself, or one it wraps), or None when `err` is a fault to retry."""
    if err is None or _depth > 8:
        return None
    if isinstance(err, RunStopped):
        # Ray re-raises a remote exception as a class deriving from both RayTaskError and its type: prefer
        # the original object, whose message is not wrapped in a remote traceback
        original = getattr(err, "cause", None)
        return original if isinstance(original, RunStopped) else err
    for inner in _inner(err):
        found = stop_reason(inner, _depth + 1)
        if found is not None:
            return found
    return None


def one_line(err: BaseException) -> str:
    """The message of `err` as one line (notes joined), without a traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    return "; ".join(lines + [note.strip() for note in getattr(err, "__notes__", ()) if note.strip()])
