"""`mlxvid serve`: a local video studio over the same prepare/execute code as `mlxvid generate`.

- `store.py`: the job store (SQLite in WAL mode): every job's options, status, progress, outputs; it survives
  restarts, and an interrupted job is queued again.
- `worker.py`: one worker thread runs the jobs in order, keeps recently used models loaded, cancels at the
  next step.
- `bodies.py`: request bodies (OpenAI Videos API fields, the S2V job API's form, our own option names) as
  generate's options, checked by `mlx_video.options.validate`.
- `app.py`: the HTTP routes (FastAPI on uvicorn) and the web page in `web/`.
"""
