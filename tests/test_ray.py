"""Ray Data scoring agrees with the single-process path (local Ray instance, a dozen samples, ~40 s)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from steerlib.finetuning.flag.scoring import score_dataset
from steerlib.store.results import read_records
from steerlib.store.samples import read_samples

ray = pytest.importorskip("ray")
pytest.importorskip("pandas")

# Starting Ray and one model-loading actor dominates: ~10 s for ray.init, ~15 s for the actor.
pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
LAYER = 16


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def test_ray_pipeline_matches_single_process(tmp_path, embedded, local_ray):
    from steerlib.finetuning.flag.ray import score_dataset_ray

    model, tok = embedded
    samples = read_samples(DATA / "planted.jsonl").samples[:12]
    torch.manual_seed(0)
    direction = torch.randn(model.config.hidden_size)  # any direction will do to compare the two paths
    local = score_dataset(model, tok, samples, direction, LAYER, out_path=tmp_path / "local.jsonl",
                          baseline="prompt_last", batch_size=4, progress=False)
    out = tmp_path / "ray.jsonl"
    distributed = score_dataset_ray(None, samples, direction, LAYER, out_path=out, baseline="prompt_last",
                                    batch_size=4, concurrency=1, progress=False)
    assert distributed.computed == 12
    assert [r["index"] for r in distributed.records] == list(range(12))
    for key in ("projection", "prompt_last_projection", "projection_diff"):
        np.testing.assert_allclose([r[key] for r in distributed.records], [r[key] for r in local.records],
                                   rtol=1e-4, atol=1e-4)
    assert [r["meta"] for r in distributed.records] == [r["meta"] for r in local.records]
    assert sorted(r["index"] for r in read_records(out)) == list(range(12))

    # finished work is not sent to Ray again
    again = score_dataset_ray(None, samples, direction, LAYER, out_path=out, baseline="prompt_last",
                              batch_size=4, progress=False)
    assert again.computed == 0 and again.records == distributed.records
