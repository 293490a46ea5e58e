"""The feedback pages: plain HTML and one script, served by the HTTP ingress (no build step, nothing
fetched from the internet), and the JSON routes they call.

    GET  /ui, /ui/label, /ui/chat, /ui/eval, /ui/admin     the pages (public: they ask for a key)
    GET  /ui/static/ui.js, /ui/static/ui.css
    GET  /ui/api/me                  the annotator of the key, and the queues
    GET  /ui/api/next?queue=Q        the annotator's next item of queue Q, and their progress
    POST /ui/api/labels              {queue, item_id, choice A|B|tie, rating_a, rating_b, comment}
    POST /ui/api/chat                {messages, max_tokens, temperature}: the served policy's answer
    POST /ui/api/feedback            {completion_id, rating | like, choice_index, comment} on a chat answer
    GET  /ui/api/admin               queues, annotators and study results (the API key, when one is set)

Annotators send `X-Annotator-Key` (the key `rlhf-ray annotators add NAME` printed), which works whether or
not the server has an API key; every label and page feedback records who gave it. The pages and their
routes are left out of /openapi.json, which documents the OpenAI-compatible API. Errors are the API's
`{"error": {"message", ...}}` with a 4xx status, and the pages show the message.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from rlhf_ray.serve.db import FeedbackError
from rlhf_ray.serve.schemas import ChatCompletionRequest, FeedbackRequest, LabelRequest, PageChatRequest

PAGES = ("label", "chat", "eval", "admin")
STATIC = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
KEY_HEADER = "X-Annotator-Key"
ADMIN_PATH = "/ui/api/admin"


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def add_page_routes(app: FastAPI, backend, chat_completions) -> None:
    """The pages and their JSON routes on `app`, over `backend` (serve/api.py's Backend) and the app's
    chat handler (a page's chat turn is an ordinary chat completion, recorded with its annotator)."""

    async def annotator(request: Request) -> str:
        return await backend.call_store("annotator_for_key", key=request.headers.get(KEY_HEADER))

    @app.get("/ui", include_in_schema=False)
    async def index():
        return RedirectResponse("/ui/label")

    for page in PAGES:
        html = _asset(f"{page}.html")
        app.add_api_route(f"/ui/{page}", lambda html=html: HTMLResponse(html), methods=["GET"],
                          include_in_schema=False)

    @app.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise FeedbackError(404, f"no page asset {name!r}", "name")
        return Response(_asset(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/ui/api/me", include_in_schema=False)
    async def me(request: Request):
        name = await annotator(request)
        queues = await backend.call_store("queues")
        return {"annotator": name, "model": backend.model_name, "policy_version": backend.policy_version,
                "queues": [{k: v for k, v in q.items() if k != "spec"} for q in queues]}

    @app.get("/ui/api/next", include_in_schema=False)
    async def next_item(request: Request, queue: str):
        return await backend.call_store("next_item", queue=queue, annotator=await annotator(request))

    @app.post("/ui/api/labels", include_in_schema=False)
    async def label(request: Request, body: LabelRequest):
        return await backend.call_store("add_label", annotator=await annotator(request), **body.model_dump())

    @app.post("/ui/api/chat", include_in_schema=False)
    async def chat(request: Request, body: PageChatRequest):
        name = await annotator(request)
        completion_request = ChatCompletionRequest.model_validate({
            "model": backend.model_name, "messages": [m.model_dump(exclude_none=True) for m in body.messages],
            "max_tokens": body.max_tokens, "temperature": body.temperature, "user": f"annotator:{name}"})
        return await chat_completions(completion_request)

    @app.post("/ui/api/feedback", include_in_schema=False)
    async def feedback(request: Request, body: FeedbackRequest):
        return await backend.call_store("add_feedback", annotator=await annotator(request), **body.model_dump())

    @app.get(ADMIN_PATH, include_in_schema=False)
    async def admin():  # the guard has checked the API key
        queues = await backend.call_store("queues")
        studies = {q["name"]: await backend.call_store("study_results", name=q["name"])
                   for q in queues if q["source"] == "study"}
        return {"model": backend.model_name, "policy_version": backend.policy_version, "queues": queues,
                "annotators": await backend.call_store("annotators"), "studies": studies}
