"""steerlib inside other interpretability libraries: TransformerLens and nnsight.

``steerlib.interop.transformer_lens`` turns steerlib ops and read-outs into ``fwd_hooks`` for a TransformerLens
``TransformerBridge``; ``steerlib.interop.nnsight`` applies them inside an nnsight ``trace()``. Both take
activations captured there back into steerlib's ``Activations`` for extraction. They need the ``interop`` extra
(``pip install steerlib[interop]``).
"""
