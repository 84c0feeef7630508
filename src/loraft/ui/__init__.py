"""`loraft ui`: the workflow in a browser, a REST API over the workspace's run directories and static pages.

    workspace.py  the workspace: paths confined to it, its runs (live status), the UI's own files (.loraft-ui/)
    launch.py     start, resume and stop `loraft train` as detached processes; the plan of a config
    jobs.py       eval, merge and export as detached jobs whose outcome outlives the UI
    events.py     a run's metrics.jsonl as server-sent events, replayable with Last-Event-ID
    chat.py       loraft serve's chat page and API for a run, a checkpoint or the base model
    data.py       data check and preview on workspace files
    requests.py   the token, a JSON body's fields, a query's numbers
    app.py        the FastAPI routes (docs/ui.md) and `serve_ui`

Nothing is imported here, so a job's own process (`python -m loraft.ui.jobs`) does not load FastAPI.
"""
