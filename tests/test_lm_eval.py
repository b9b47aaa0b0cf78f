"""EleutherAI's lm-evaluation-harness against a live ``steerlib serve`` (issue 29).

A multiple-choice task (items of the shipped capability set, written as a local task: YAML + JSONL, no Hub) runs
through ``local-completions`` (``/v1/completions`` with ``echo`` and ``logprobs``) and through lm-eval's own ``hf``
backend on the same model: the accuracies are equal and every per-choice log-likelihood agrees to 1e-4. Run with a
steering preset (the request's ``model``), the same task's log-likelihoods equal ``steerlib.evaluation.capability``
under the same steering. A generation task runs through ``local-chat-completions``, unsteered and with a preset.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")

from steerlib.core.models import resolve_model_path  # noqa: E402
from steerlib.evaluation.capability import choice_loglikelihoods, load_capability_set  # noqa: E402
from steerlib.serve import AppOptions, BackgroundServer, SteeringSpec, create_app  # noqa: E402
from steerlib.steering.steer import build_ops  # noqa: E402

pytestmark = pytest.mark.slow

PRESET = {"vector": "optimistic", "layer": 10, "coef": 8.0}
WORDS = ["apple", "river", "candle", "garden", "silver", "window"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """Two local lm-eval tasks: ``steerlib_mc`` (2 capability items of each kind) and ``steerlib_copy`` (generate)."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    items = load_capability_set(limit=2)
    (root / "mc.jsonl").write_text("".join(json.dumps({"question": i.question, "choices": list(i.choices),
                                                       "answer": i.answer}) + "\n" for i in items))
    (root / "mc.yaml").write_text(f"""task: steerlib_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
""")
    (root / "copy.jsonl").write_text("".join(json.dumps({"word": w}) + "\n" for w in WORDS[:4]))
    (root / "copy.yaml").write_text(f"""task: steerlib_copy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "copy.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "Repeat this word exactly, and nothing else: {{{{word}}}}"
doc_to_target: "{{{{word}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    ignore_case: true
    ignore_punctuation: true
""")
    return root


@pytest.fixture(scope="module")
def server(embedded, optimism_vectors) -> Iterator[tuple[str, object]]:
    model, tok = embedded
    options = AppOptions(model_name="smol", max_tokens_limit=32, default_max_tokens=8,
                         presets=(("cheerful", (SteeringSpec(**PRESET),)),))
    app = create_app(model, tok, {"optimistic": optimism_vectors}, options)
    with BackgroundServer(app) as srv:
        yield srv.url, app.state.service


@pytest.fixture(scope="module")
def task_manager(tasks: Path):
    """One index of the two local tasks, shared by every run. lm-eval's own tasks are left out of it: indexing
    their thousands of YAML files costs over a minute per ``TaskManager`` on a busy 2-core machine, and no test
    here runs one of them."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(tasks), include_defaults=False)


def _evaluate(task_manager, task: str, model: str, model_args: str, **kw) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task],
                                   task_manager=task_manager, log_samples=True,
                                   num_fewshot=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                   fewshot_random_seed=0, **kw)


def _loglikelihoods(result: dict, task: str) -> list[list[float]]:
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_local_completions_equals_the_hf_backend_and_steers_with_a_preset(task_manager, server, embedded,
                                                                         optimism_vectors):
    url, _ = server
    folder, _ = resolve_model_path(None)
    api = f"base_url={url}/v1/completions,tokenizer={folder},tokenizer_backend=huggingface,num_concurrent=1," \
          "max_retries=1,tokenized_requests=True"
    served = _evaluate(task_manager, "steerlib_mc", "local-completions", f"model=smol,{api}")
    reference = _evaluate(task_manager, "steerlib_mc", "hf", f"pretrained={folder},dtype=float32,device=cpu",
                          batch_size=4)
    acc = served["results"]["steerlib_mc"]["acc,none"]
    assert acc == reference["results"]["steerlib_mc"]["acc,none"]
    got, want = _loglikelihoods(served, "steerlib_mc"), _loglikelihoods(reference, "steerlib_mc")
    assert len(got) == 12 and all(len(g) == len(w) for g, w in zip(got, want, strict=True))
    worst = max(abs(a - b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert worst < 1e-4, worst
    print(f"\nlm-eval steerlib_mc: acc {acc:.4f} on both backends; max per-choice |dLL| {worst:.2e}")

    # The preset (picked by the request's model name) steers the prompt's log-probabilities: lm-eval's numbers
    # are the capability module's under the same steering.
    steered = _evaluate(task_manager, "steerlib_mc", "local-completions", f"model=cheerful,{api}")
    model, tok = embedded
    ops = build_ops(model, optimism_vectors, PRESET["layer"], PRESET["coef"])
    expected = choice_loglikelihoods(model, tok, load_capability_set(limit=2), ops)
    got_steered = _loglikelihoods(steered, "steerlib_mc")
    assert max(abs(a - b) for g, w in zip(got_steered, expected, strict=True)
               for a, b in zip(g, w, strict=True)) < 1e-4
    assert max(abs(a - b) for g, w in zip(got_steered, got, strict=True) for a, b in zip(g, w, strict=True)) > 0.1


def test_local_chat_completions_runs_a_generation_task_unsteered_and_with_a_preset(task_manager, server):
    url, _ = server
    answers = {}
    for model in ("smol", "cheerful"):
        result = _evaluate(task_manager, "steerlib_copy", "local-chat-completions",
                           f"model={model},base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1",
                           apply_chat_template=True)
        score = result["results"]["steerlib_copy"]["exact_match,none"]
        samples = sorted(result["samples"]["steerlib_copy"], key=lambda s: s["doc_id"])
        answers[model] = [s["resps"][0][0] for s in samples]
        # What lm-eval recorded is what the server answers that prompt with that model (greedy).
        direct = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
            "model": model, "temperature": 0, "max_tokens": 6,
            "messages": [{"role": "user", "content": f"Repeat this word exactly, and nothing else: {WORDS[0]}"}]})
        assert answers[model][0] == direct.json()["choices"][0]["message"]["content"].split("\n")[0]
        assert score == sum(a.strip().strip(".!").lower() == w for a, w in zip(answers[model], WORDS,
                                                                                  strict=False)) / 4
        print(f"\nlm-eval steerlib_copy ({model}): exact_match {score:.2f} {answers[model]}")
    assert answers["smol"] != answers["cheerful"]
