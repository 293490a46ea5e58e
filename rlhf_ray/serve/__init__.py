"""Serving a trained policy on Ray Serve, and collecting human feedback on what it writes.

    config.py          ServeConfig: the policy, bounds on requests, replicas, batching, the API key
    schemas.py         OpenAI request/response bodies (pydantic), feedback; text must be Unicode
    prompts.py         PromptCodec: tokenizer, chat template and context length, without the weights
    engine.py          GenerationEngine: steps the shared decoder (rlhf_ray/decoding.py) for requests that
                       join and leave a running batch, each with its own settings, budget and seed
    decode_loop.py     DecodeLoop: a replica's asynchronous loop around the engine (continuous batching)
    text.py            incremental detokenisation and stop strings: text as it is made
    api.py             the FastAPI app over a backend: routes, errors, SSE streams
    checks.py          request checks beyond the schema (model, bounds, context) and validation messages
    openapi.py         /openapi.json: every status, the SSE streams, the API key, the configured bounds
    guard.py           the outermost ASGI layer: API key, request size and body timeout, no traceback to clients
    app.py             the Serve deployments (HTTP ingress; autoscaled model replicas, each with a decode
                       loop; feedback store)
    feedback_store.py  SQLite (WAL) completions and feedback; export for reward-model training
    policy.py          model id and policy version of a policy folder
    cli.py             `rlhf-ray serve` and `rlhf-ray feedback export`

Importing this package imports nothing heavy; `app` imports Ray Serve, `engine` torch.
"""
