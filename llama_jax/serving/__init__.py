"""`infer.py serve`: an OpenAI-compatible HTTP server with continuous batching over a paged KV
cache. One file per job: pages (allocator + prefix cache), scheduler, step (the jitted engine
step), engine (the loop beside the server), detokenizer, protocol (request checks, errors),
metrics, api (the FastAPI app) and server (uvicorn, draining on SIGTERM)."""
