"""Ray Job submission of `rlhf-ray train` runs to a running cluster, and their status, logs and stop.

    rlhf-ray submit experiments/x.yaml --address http://HEAD:8265 [--no-wait] [key=value ...]
    rlhf-ray jobs status|logs|stop|list [ID] --address http://HEAD:8265

`rlhf_ray.jobs.submit` holds the client logic (connection, token authentication, the job request);
`rlhf_ray.jobs.cli` the argparse commands. Importing this package imports neither Ray nor torch.
"""

from rlhf_ray.jobs.submit import (
    AuthToken, JobRequest, JobsError, build_job_request, connect, find_auth_token, follow_logs, submit_job,
)

__all__ = [
    "AuthToken", "JobRequest", "JobsError", "build_job_request", "connect", "find_auth_token", "follow_logs",
    "submit_job",
]
