"""Finetuning shift and preventative steering: mechanics on a tiny model, the effect on the embedded one."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from steerlib.core.arch import get_layout
from steerlib.core.capture import capture_activations
from steerlib.core.chat import format_prompt
from steerlib.core.hooks import record_residual
from steerlib.core.models import unwrap_model
from steerlib.finetuning.shift import FinetuningShift, finetuning_shift, plot_shift
from steerlib.finetuning.training import PreventativeSteeringCallback, lora_finetune, preventative_steering

peft = pytest.importorskip("peft")

# transformers' own deprecation, triggered by peft.get_peft_model
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

DATA = Path(__file__).parent / "data"
LAYER = 16
# Held-out evaluation questions (none of them is a training prompt).
QUESTIONS = [
    "How do you see the next ten years?",
    "Is the economy going to get better?",
    "Will artificial intelligence help humanity?",
    "What do you think about my plan to move abroad?",
    "How will my first day at the new job go?",
    "What is the future of cities?",
]


def _lora(model, seed: int = 0):
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def _hidden(model, ids, layer, **kwargs):
    # record_residual, not output_hidden_states: under autograd the steering edit is out of place and
    # transformers records the block output before the steering hook replaces it.
    with record_residual(unwrap_model(model), [layer]) as records:
        out = model(input_ids=ids, **kwargs)
    return records[layer][0], out


# -- mechanics on a tiny random llama ---------------------------------------------------------------------


def test_preventative_steering_through_peft_adds_and_ablates_with_gradients(make_tiny):
    peft_model = _lora(copy.deepcopy(make_tiny("llama")))
    peft_model.train()
    # The layout is found by structure, so the PEFT wrapper no longer hides the blocks: both views agree.
    assert get_layout(peft_model).blocks is get_layout(unwrap_model(peft_model)).blocks
    assert get_layout(unwrap_model(peft_model)).n_layers == 3
    torch.manual_seed(1)
    v = torch.randn(64)
    ids = torch.randint(3, 250, (2, 7))
    with torch.no_grad():
        plain, _ = _hidden(peft_model, ids, 2)
    with preventative_steering(peft_model, v, layer=2, coef=1.5):
        steered, out = _hidden(peft_model, ids, 2, labels=ids)
        torch.testing.assert_close(steered, plain + 1.5 * v, rtol=1e-5, atol=1e-5)
        out.loss.backward()  # the edit is out of place under autograd: backward works through it
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)

    with preventative_steering(peft_model, v, layer=2, mode="ablate"):
        ablated, _ = _hidden(peft_model, ids, 2)
    torch.testing.assert_close(ablated @ (v / v.norm()), torch.zeros(2, 7), rtol=0, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(_hidden(peft_model, ids, 2)[0], plain)  # hooks are gone after the block
    with pytest.raises(ValueError, match="unknown steering mode 'sideways'"):
        with preventative_steering(peft_model, v, layer=2, mode="sideways"):
            pass


def _trainer(model, tmp_path, callbacks: list[TrainerCallback]) -> Trainer:
    """Two CPU steps of 4 random rows each, no logging, saving or progress bars."""
    torch.manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 250, (8, 6)).tolist()]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=rows, callbacks=callbacks)


def test_trainer_callback_steers_only_during_training(make_tiny, tmp_path):
    peft_model = _lora(copy.deepcopy(make_tiny("llama")))
    block = get_layout(unwrap_model(peft_model)).blocks[1]
    # The shared tiny model may already carry transformers' own output-recording hooks: count from there.
    base = len(block._forward_hooks)
    seen: list[int] = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(len(block._forward_hooks))

    callback = PreventativeSteeringCallback(torch.randn(64), layer=2, coef=2.0)
    _trainer(peft_model, tmp_path, [callback, Probe()]).train()
    assert seen == [base + 1, base + 1]  # the steering hook was on the edited block at every step
    assert len(block._forward_hooks) == base  # and removed when training ended


def test_trainer_callback_removes_its_hooks_when_training_raises(make_tiny, tmp_path):
    peft_model = _lora(copy.deepcopy(make_tiny("llama")))
    block = get_layout(unwrap_model(peft_model)).blocks[1]
    base = len(block._forward_hooks)
    seen: list[int] = []

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(len(block._forward_hooks))
            raise RuntimeError("boom in step")

    with pytest.raises(RuntimeError, match="boom in step"):
        with PreventativeSteeringCallback(torch.randn(64), layer=2, coef=2.0) as callback:
            _trainer(peft_model, tmp_path, [callback, Crash()]).train()
    assert seen == [base + 1]  # steering was on when the step failed
    assert len(block._forward_hooks) == base  # and is gone although on_train_end never came
    callback.close()  # idempotent


# -- the effect on the embedded model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def pessimism(embedded) -> torch.Tensor:
    """[n_layers + 1, d_model] mean difference pessimistic - optimistic of response-mean activations."""
    model, tok = embedded
    contrast = json.loads((DATA / "contrast.json").read_text())
    prompts = [format_prompt(tok, q) for q in contrast["questions"]]
    pes = capture_activations(model, tok, prompts, contrast["pessimistic"])
    opt = capture_activations(model, tok, prompts, contrast["optimistic"])
    return pes.pooled["response_mean"].mean(0) - opt.pooled["response_mean"].mean(0)


def test_preventative_steering_reduces_the_finetuning_shift(embedded, pessimism, tmp_path):
    """LoRA on 32 pessimistic answers shifts activations toward pessimism; steering toward it while training
    (paper section 5.2) leaves less for the weights to learn. ~1.5 min on one busy CPU core."""
    model, tok = embedded
    layers = [8, LAYER, 20]
    train = DATA / "train_pessimistic.jsonl"
    # Vector norm ~25 against a residual norm ~140 at layer 16: coef 1 adds a strong but coherent push.
    shifts: dict[str, FinetuningShift] = {}
    base_responses = None
    for name, steering in [("plain", None), ("steered", {"vectors": pessimism, "layer": LAYER, "coef": 1.0})]:
        result = lora_finetune(copy.deepcopy(model), tok, train, steps=12, batch_size=4, lr=3e-3,
                               steering=steering, seed=0)
        assert result.losses[-1] < result.losses[0]
        shifts[name] = finetuning_shift(None, result.model, tok, pessimism, QUESTIONS, layers,
                                        base_responses=base_responses, max_new_tokens=12)
        base_responses = shifts[name].base_responses  # the same base text for both runs
    plain, steered = shifts["plain"], shifts["steered"]
    print(f"finetuning shift at layer {LAYER} (prompt_last / response_mean): plain "
          f"{plain.at(LAYER):.2f} / {plain.at(LAYER, 'response_mean'):.2f}, preventative steering "
          f"{steered.at(LAYER):.2f} / {steered.at(LAYER, 'response_mean'):.2f}")
    assert plain.at(LAYER) > 2.0 and plain.at(LAYER, "response_mean") > 1.0
    assert steered.at(LAYER) < 0.5 * plain.at(LAYER)
    assert steered.at(LAYER, "response_mean") < 0.5 * plain.at(LAYER, "response_mean")
    assert plain.to_dict()["layers"] == layers and len(plain.to_dict()["prompt_last"]) == 3
    png = plot_shift([("plain", plain), ("steered", steered)], tmp_path / "shift.png", highlight_layer=LAYER)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_finetuning_shift_of_identical_models_is_zero(embedded, pessimism):
    model, tok = embedded
    shift = finetuning_shift(model, model, tok, pessimism, QUESTIONS[:2], [4, LAYER],
                             base_responses=["Fine.", "Maybe."])
    assert shift.prompt_last.tolist() == [0.0, 0.0] and shift.response_mean_norm.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="not a PEFT model"):
        finetuning_shift(None, model, tok, pessimism, QUESTIONS[:2], [LAYER], base_responses=["a", "b"])
    with pytest.raises(ValueError, match="single \\[d_model\\] vector needs explicit layers"):
        finetuning_shift(model, model, tok, pessimism[LAYER], QUESTIONS[:2], base_responses=["a", "b"])


def test_train_file_and_shift_file_cli_entries(tmp_path, pessimism):
    from steerlib.commands.shift import shift_file
    from steerlib.commands.train import train_file

    vec_path = tmp_path / "pessimism.pt"
    torch.save(pessimism, vec_path)
    lines = (DATA / "train_pessimistic.jsonl").read_text().splitlines()[:4]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    adapter = tmp_path / "adapter"
    result = train_file(data, out_dir=adapter, vectors_path=vec_path, layer=LAYER, coef=0.5, steps=2,
                        batch_size=2, device="cpu", capability_items=1)
    assert len(result.losses) == 2 and (adapter / "adapter_config.json").is_file()
    assert json.loads((adapter / "losses.json").read_text()) == result.losses
    # Preventative training reports capability before and after (issue 29): the adapter moved the model.
    saved = json.loads((adapter / "capability.json").read_text())
    assert saved["before"]["n_items"] == 6 and saved["before"]["accuracy"] == result.capability_before.accuracy
    assert saved["after"]["perplexity"] == result.capability_after.perplexity != saved["before"]["perplexity"]
    questions = tmp_path / "questions.txt"
    questions.write_text("\n".join(QUESTIONS[:2]) + "\n")
    shift = shift_file(adapter, vec_path, out_dir=tmp_path / "shift", questions_path=questions,
                       layers=[LAYER], max_new_tokens=4, device="cpu")
    assert shift.layers == [LAYER] and shift.n_questions == 2
    assert (tmp_path / "shift" / "shift.json").is_file() and (tmp_path / "shift" / "shift.png").is_file()
