"""Editing the residual stream while the model runs, with per-token trait read-out (fused op in ``steerlib.kernels``)."""
