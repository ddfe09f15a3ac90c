"""Training of the built-in default model: a small DeepSeek-V3-architecture code model (with one MTP layer)
trained on the Python standard library. Needs `transformers` (pip install 'dsinfer[train]').

    python -m dsinfer.tools.train --out dsinfer/default_model
"""
