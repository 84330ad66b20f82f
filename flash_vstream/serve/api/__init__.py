"""The streaming server's parts (run by `python -m flash_vstream.serve.server`).

scheduler.py      ServerEngine: the engine (serve/engine.py) as the server runs it: ids, limits, idle reaping
state.py          Settings, the loaded model, the engine and the Prometheus metrics of one app
inputs.py         request bodies, images, data URLs and --media-root paths, checked
app.py            the FastAPI app: auth, error shapes, health, metrics, models, sessions, frames, questions
websocket.py      /v1/sessions/{id}/ws: frames and questions in, answers streamed out
openai_compat.py  /v1/chat/completions (with SSE streaming): live sessions or one-shot videos and images
"""
