"""`hyimage serve`: one loaded pipeline behind a small web page and an OpenAI-compatible images API.

- `validation`: the request body of `POST /v1/images/generations` checked field by field (errors name the field).
- `worker`: one thread owns the pipeline; a bounded queue; compatible requests batched; cancellation; progress.
- `app`: the FastAPI application (routes, API key, OpenAI error shape, server-sent events).
- `options`: the startup options checked by both the CLI and `create_app` (the API key).
- `page.html`: the page at `/`.

The `serve` subcommand (hyimage/cli/serve.py) builds the pipeline and starts uvicorn; serving imports the
pipelines' output helpers and the bottom modules, never the CLI.

Page: our own single HTML file (plain JavaScript, no build step, no CDN) served by the same FastAPI app,
not Gradio. Gradio would add a second web framework, ~100 MB of dependencies and its own queue beside ours,
while the page needs one form, a progress line and a gallery; our page talks to the same
`/v1/images/generations` endpoint as any client (streamed as server-sent events), so the browser test also
exercises the public API, and it works offline (nothing fetched from the Internet).
"""
