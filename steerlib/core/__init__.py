"""The foundation: models and where their residual stream lives, chat formatting, activation capture, vectors.

Nothing here imports from the layers above (store, traits, extraction, steering, monitoring, finetuning, serve).
"""
