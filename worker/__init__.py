"""Worker processes: claim queued requests, run them through a model, report
the outcomes. Every state change goes through app.queue.operations.Queue.

    worker/config.py   the models file (TOML): what a worker can serve
    worker/loader.py   import, construct and load() a model class
    worker/runner.py   one model in one process: claims, batching, execution
    worker/process.py  one worker process: leases, wake-up, finish, shutdown
    worker/capture.py  per-request capture of the model's log and print output
    worker/models/     the shipped models (echo, sleep, torch-mlp, minilm)
"""
