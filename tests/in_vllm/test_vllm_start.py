"""A model whose decoder layers steerlib cannot find makes vLLM fail at start, naming the reason.

The refusal is the plugin's, in the worker's ``load_model`` (``steerlib.vllm.worker.find_layers``), whatever
process the worker lives in. ``LLM(...)`` runs here with vLLM's engine in its own process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: one process imports vLLM instead of three, the API process, the engine core
and its worker; 113 s of a loaded 2-core run were those imports and the executor's shutdown grace).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
import transformers
from vllm_helpers import own_core


def test_unsupported_model_fails_at_start(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    script = tmp_path / "start.py"
    script.write_text(textwrap.dedent(f"""
        from vllm import LLM

        if __name__ == "__main__":
            LLM(model={str(tmp_path / "gpt2")!r}, skip_tokenizer_init=True, enforce_eager=True, max_model_len=128,
                dtype="float32")
            print("STARTED")
    """))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with own_core(env):
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "STARTED" not in out
    assert "steerlib: cannot find the decoder layers of GPT2LMHeadModel" in out
