"""patch_model: a patched Hugging Face causal LM gives the unpatched loss and gradients (every family,
tied and untied heads, a head bias, the final-logit softcap, num_items_in_batch, pre-shifted labels),
never runs its head over the sequence, and behaves exactly as before without labels."""

import copy

import pytest
import torch
import transformers

from autoregembed_fast import patch_model
from autoregembed_fast.huggingface import SUPPORTED_MODELS
from tiny_models import FAMILIES, HIDDEN, VOCAB, tiny_model

LENGTH = 11


def batch(seed=1, batch_size=3):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # a right-padded row
    labels = torch.where(attention_mask.bool(), input_ids, -100)
    labels[0, :4] = -100  # a prompt that is not scored
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    outputs = model(**inputs)
    outputs.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def assert_same_training_signal(plain, patched, inputs):
    expected, expected_grads = loss_and_grads(plain, inputs)
    actual, actual_grads = loss_and_grads(patched, inputs)
    assert actual.logits is None
    assert torch.allclose(actual.loss, expected.loss, rtol=1e-5, atol=0)
    assert actual_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        scale = grad.abs().max()
        assert (actual_grads[name] - grad).abs().max() <= 1e-4 * scale + 1e-7, name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("normaliser", ["mean", "num-items-in-batch"])
def test_patched_loss_and_every_gradient_equal_the_unpatched(family, normaliser):
    plain = tiny_model(family)
    patched = patch_model(copy.deepcopy(plain))
    inputs = batch()
    if normaliser == "num-items-in-batch":
        # The Trainer passes the scored-token count of the whole accumulated batch (here: 3x ours).
        inputs["num_items_in_batch"] = torch.tensor(3 * int((inputs["labels"][:, 1:] != -100).sum()))
    assert_same_training_signal(plain, patched, inputs)


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_pre_shifted_labels(family):
    plain, inputs = tiny_model(family), batch()
    patched = patch_model(copy.deepcopy(plain))
    # As in Hugging Face, shift_labels (e.g. from context parallelism) replace the shifted labels.
    inputs["shift_labels"] = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[..., 1:].clone()
    inputs["shift_labels"][2, 3:6] = -100
    assert_same_training_signal(plain, patched, inputs)


@pytest.mark.parametrize("family", ["gemma2", "llama-head-bias"])
def test_under_bf16_autocast_close_to_unpatched(family):
    plain = tiny_model(family)
    patched = patch_model(copy.deepcopy(plain))
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(**inputs).loss
        actual = patched(**inputs).loss
    # Both use bf16 operands for the head; the unpatched one also rounds its logits to bf16.
    assert torch.allclose(actual.float(), expected.float(), rtol=2e-2, atol=0)


def test_the_head_never_runs_over_the_sequence():
    model = patch_model(tiny_model("llama-untied"))
    calls = []
    model.lm_head.register_forward_hook(lambda *args: calls.append(1))
    model(**batch())
    assert calls == []


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_without_labels_the_model_is_unchanged(family):
    plain = tiny_model(family).eval()
    patched = patch_model(copy.deepcopy(plain))
    inputs = batch()
    del inputs["labels"]
    assert torch.equal(patched(**inputs).logits, plain(**inputs).logits)
    prompt = inputs["input_ids"][:1, :5]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(prompt, **settings), plain.generate(prompt, **settings))


def test_deep_copy_of_a_patched_model_uses_its_own_weights():
    patched = patch_model(tiny_model("qwen2"))
    copied = copy.deepcopy(patched)
    with torch.no_grad():
        copied.get_output_embeddings().weight.zero_()
    inputs = batch()
    del inputs["labels"]
    assert (copied(**inputs).logits == 0).all()
    assert not (patched(**inputs).logits == 0).all()


def test_unsupported_models_are_refused():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=4)
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        patch_model(transformers.GPT2LMHeadModel(config))
    assert "LlamaForCausalLM" in SUPPORTED_MODELS


def test_logits_to_keep_with_labels_is_refused():
    model = patch_model(tiny_model("llama-untied"))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**batch(), logits_to_keep=1)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n, seed=2):
        generator = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            ids = torch.randint(0, VOCAB, (LENGTH,), generator=generator)
            labels = ids.clone()
            labels[: int(torch.randint(1, 6, (1,), generator=generator))] = -100  # prompts vary
            self.rows.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels))

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


def trainer_losses(model, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=4, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0,
        save_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(16))
    trainer.train()
    return [record["loss"] for record in trainer.state.log_history if "loss" in record]


def test_trainer_steps_give_the_unpatched_loss_curve(tmp_path):
    """A few optimizer steps with gradient accumulation (so the Trainer passes num_items_in_batch):
    the patched model's loss curve is the unpatched one's."""
    plain = tiny_model("smollm")
    patched = patch_model(copy.deepcopy(plain))
    expected = trainer_losses(plain, tmp_path / "plain")
    actual = trainer_losses(patched, tmp_path / "patched")
    assert len(expected) == 4
    assert expected[0] != expected[-1]  # the steps moved the model
    assert actual == pytest.approx(expected, rel=1e-4)
