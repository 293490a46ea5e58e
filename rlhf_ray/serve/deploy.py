"""Start the policy server on a Ray cluster, or switch the policy it serves, without a moment of downtime.

The app is deployed declaratively, as `serve deploy` and a RayService deploy it: the import path
`rlhf_ray.serve.app:app_builder`, `args` the fields of `ServeConfig`, and the two model-facing deployments'
`user_config` a `PolicyUpdate`. Deploying again with the same config and another update is then a
lightweight update (Serve keeps the code version, the hash of import path and args): every replica stays
up and `reconfigure` loads the new policy beside the old one before switching. Requests in flight finish
on the old policy, new ones get the new one, and none fails; `tests/test_serve_swap.py` shows it. (Running
`serve.run` on a rebuilt app instead replaces the replicas: Serve gives an imperative deployment a new
random code version each time.)
"""

from __future__ import annotations

import time

from rlhf_ray.serve.config import PolicyUpdate, ServeConfig

IMPORT_PATH = "rlhf_ray.serve.app:app_builder"
UPDATED_DEPLOYMENTS = ("PolicyServer", "OpenAIServer")  # the ones with a `reconfigure`


def app_schema(config: ServeConfig, update: PolicyUpdate | None = None) -> dict:
    """The Serve application config (one entry of `applications:`) of `config`, serving `update`'s policy."""
    from rlhf_ray.serve.app import APP_NAME

    user_config = (update or PolicyUpdate()).model_dump(mode="json")
    return {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH,
            "args": config.model_dump(mode="json"),
            "deployments": [{"name": name, "user_config": user_config} for name in UPDATED_DEPLOYMENTS]}


def deploy(config: ServeConfig, update: PolicyUpdate | None = None, timeout_s: float = 600.0) -> dict:
    """Deploy (or update) the app on the connected cluster (after `serve.start`) and wait, at most
    `timeout_s`, until it runs and a model replica serves `update`'s version; returns that replica's
    `serving()`. RuntimeError with Serve's message if the deployment fails, TimeoutError past the bound."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails

    from rlhf_ray.serve.app import APP_NAME

    # what `serve run CONFIG` does (ray/serve/scripts.py, Ray 2.60): the controller applies the config. A
    # declarative config lists every declaratively deployed app (one left out is deleted): keep the others.
    client = _get_global_client()
    details = ServeInstanceDetails.model_validate(client.get_serve_details())
    others = [app.deployed_app_config.model_dump(mode="json", exclude_unset=True)
              for name, app in details.applications.items()
              if name != APP_NAME and app.deployed_app_config is not None]
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [*others, app_schema(config, update)]}))
    wanted = update.policy_version if update is not None else None
    deadline, last = time.monotonic() + timeout_s, "not started"
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        last = app.status if app is not None else "not started"
        if last == "DEPLOY_FAILED":
            raise RuntimeError(f"the application failed to deploy: {app.message}")
        if last == "RUNNING":
            serving = serve.get_deployment_handle("PolicyServer", APP_NAME).serving.remote().result(timeout_s=60)
            if wanted is None or serving["policy_version"] == wanted:
                return serving
            last = f"RUNNING, a model replica still serving {serving['policy_version']}"
        time.sleep(0.5)
    raise TimeoutError(f"waited {timeout_s:.0f} s for the application to serve "
                       f"{wanted or config.policy}; it is {last}")
