"""Sparse autoencoders on steerlib's residual stream: corpus, activation cache, training, decomposition, diffing.

The folder format and the SAE value type live in ``steerlib.core.sae_format`` (the one vector loader reads latents
as ``sae:<folder>#<id>``); this package makes SAEs and reads models through them.
"""
