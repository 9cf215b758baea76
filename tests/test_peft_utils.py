"""PEFT helpers: building each method, what trains, sizes on disk, merging, AdaLoRA's budget inside fit."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from mfkit.env import seed_everything
from mfkit.errors import MfkitError
from mfkit.loaders import make_loader, pad_collate
from mfkit.peft_utils import (
    METHODS,
    AdaLoraBudget,
    adalora_ranks,
    bnb_4bit_config,
    build_peft_model,
    default_targets,
    dtype_of_precision,
    kbit_device_map,
    merge_check,
    model_family,
    parameter_report,
    prepare_kbit_model,
    qlora_support,
    saved_size,
    training_state_bytes,
)
from mfkit.training import TrainConfig, fit, make_accelerator


def tiny_bert() -> BertForSequenceClassification:
    seed_everything(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def tiny_llama() -> LlamaForCausalLM:
    seed_everything(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def batch(n: int = 4, length: int = 10) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (n, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(n) % 2}


def test_families_and_default_targets():
    assert model_family(tiny_bert()) == "bert"
    assert model_family(tiny_llama()) == "llama"
    assert default_targets(tiny_bert(), "lora") == (["query", "key", "value", "dense"], None)
    targets, feedforward = default_targets(tiny_llama(), "ia3")
    assert set(feedforward) <= set(targets)
    assert "down_proj" in default_targets(tiny_llama(), "lora")[0]
    assert default_targets(tiny_bert(), "prompt") == (None, None)
    with pytest.raises(MfkitError, match="method"):
        default_targets(tiny_bert(), "dora")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_freezes_the_encoder_and_trains_the_head(method):
    base = tiny_bert()
    reference = sum(p.numel() for p in base.parameters())
    model = build_peft_model(base, method, r=4, total_steps=20, num_virtual_tokens=3)
    report = parameter_report(model, reference=reference)
    assert 0 < report["trainable"] < reference / 2
    assert report["trainable_pct"] == pytest.approx(100 * report["trainable"] / reference)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("classifier" in n for n in trainable), "the new head must stay trainable"
    assert not any("word_embeddings" in n for n in trainable)
    out = model(**batch())
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert training_state_bytes(model) == 12 * report["trainable"]


def test_lora_parameter_count_follows_the_rank():
    def lora_count(**kw):
        model = build_peft_model(tiny_bert(), "lora", **kw)
        return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    # a d x k matrix gets r (d + k) numbers. Per layer: query, key, value, attention output (32 x 32), then the
    # feed-forward 32 -> 64 and 64 -> 32; once more the pooler (32 x 32). Two layers.
    per_rank = 2 * (4 * 64 + 96 + 96) + 64
    assert lora_count(r=2) == 2 * per_rank
    assert lora_count(r=8) == 8 * per_rank
    assert lora_count(r=8, target_modules=["query", "value"]) == 8 * 2 * 2 * 64
    assert sum(p.numel() for p in tiny_bert().parameters()) > lora_count(r=8)


def test_lora_on_a_decoder_targets_every_projection():
    model = build_peft_model(tiny_llama(), "lora", r=2)
    adapted = {n.split(".")[-4] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_adalora_needs_its_schedule_length():
    with pytest.raises(MfkitError, match="total_steps"):
        build_peft_model(tiny_bert(), "adalora")
    with pytest.raises(MfkitError, match="no steps left"):
        build_peft_model(tiny_bert(), "adalora", total_steps=2, tinit=1, tfinal=1)


def test_bad_target_modules_give_an_actionable_error():
    with pytest.raises(MfkitError, match="target_modules"):
        build_peft_model(tiny_bert(), "lora", target_modules=["no_such_layer"])


def test_adapter_on_disk_is_a_small_part_of_the_checkpoint(tmp_path):
    full = saved_size(tiny_bert())
    model = build_peft_model(tiny_bert(), "lora", r=2)
    adapter = saved_size(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert 0 < adapter < full / 3


def test_merged_model_gives_the_same_logits():
    model = build_peft_model(tiny_bert(), "lora", r=4)
    with torch.no_grad():  # B starts at zero (the adapter is a no-op); give it values so merging matters
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    check = merge_check(model, batch())
    assert check.max_abs_diff < 1e-5
    assert not hasattr(check.merged, "peft_config")
    assert check.parameters_after == sum(p.numel() for p in tiny_bert().parameters())
    assert check.parameters_after < check.parameters_before
    # the adapter really changed the outputs, and the unmerged model still works (the merge used a copy)
    plain = tiny_bert().eval()
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    with torch.no_grad():
        assert (plain(**inputs).logits - check.merged(**inputs).logits).abs().max() > 1e-3
        model(**inputs)


def test_prompt_tuning_cannot_merge():
    model = build_peft_model(tiny_bert(), "prompt", num_virtual_tokens=2)
    with pytest.raises(MfkitError, match="cannot merge"):
        merge_check(model, batch())


def test_adalora_budget_prunes_ranks_during_fit():
    rows = [
        {"input_ids": b.tolist(), "attention_mask": [1] * len(b), "labels": int(i % 2)}
        for i, b in enumerate(torch.randint(1, 40, (32, 8), generator=torch.Generator().manual_seed(0)))
    ]
    loader = make_loader(rows, 8, pad_collate(0), seed=0)
    steps = 20
    model = build_peft_model(tiny_bert(), "adalora", r=2, total_steps=steps, tinit=2, tfinal=4, deltaT=1)
    start = adalora_ranks(model)
    assert set(start.values()) == {3}  # init_r = ceil(1.5 r)
    history = fit(
        model, loader, TrainConfig(max_steps=steps, lr=1e-2, progress=False), callbacks=[AdaLoraBudget()]
    )
    assert history.steps == steps
    end = adalora_ranks(model)
    assert end.keys() == start.keys()
    assert sum(end.values()) <= 2 * len(end)  # average rank pruned down to target_r = r
    assert model.peft_config["default"].rank_pattern is not None


def test_adalora_budget_refuses_other_models():
    rows = [{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 0}] * 4
    model = build_peft_model(tiny_bert(), "lora", r=2)
    with pytest.raises(MfkitError, match="AdaLoRA"):
        fit(
            model,
            make_loader(rows, 2, pad_collate(0)),
            TrainConfig(max_steps=1, progress=False),
            callbacks=[AdaLoraBudget()],
        )


def test_qlora_support_explains_itself():
    ok, reason = qlora_support()
    if not torch.cuda.is_available():
        assert not ok and "CUDA" in reason
    else:
        assert ok or "bitsandbytes" in reason


def adalora_rows() -> list[dict]:
    return [
        {"input_ids": b.tolist(), "attention_mask": [1] * len(b), "labels": int(i % 2)}
        for i, b in enumerate(torch.randint(1, 40, (32, 8), generator=torch.Generator().manual_seed(0)))
    ]


@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_adalora_budget_skips_overflow_steps_under_loss_scaling(grad_clip):
    """fp16's GradScaler, here on the CPU, with a loss x scale that overflows for the first steps (until the scale has
    backed off): the fused AdamW step still runs (and skips the update itself), so the hook sees infinite
    gradients; they must not reach the importance scores (AdaLoRA's E starts at zero: 0 x inf = nan for good)."""
    steps = (
        12  # of a schedule of 100: the scores are still there at the end (the final allocation clears them)
    )
    model = build_peft_model(tiny_bert(), "adalora", r=2, total_steps=100, tinit=2, tfinal=10, deltaT=1)
    config = TrainConfig(max_steps=steps, lr=1e-2, progress=False, grad_clip=grad_clip)
    accelerator = make_accelerator(config)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    budget = AdaLoraBudget()
    fit(
        model,
        make_loader(adalora_rows(), 8, pad_collate(0), seed=0),
        config,
        callbacks=[budget],
        accelerator=accelerator,
        loss_fn=lambda m, batch: 4 * m(**batch).loss,
    )  # 4 x 0.7 x 2^127 overflows float32; the loss does not
    assert (
        budget.skipped_steps[:2] == [0, 1] and len(budget.skipped_steps) < steps - 5
    )  # skipped, then scored
    assert accelerator.scaler.get_scale() < 2.0**127
    allocator = model.base_model.rankallocator
    assert allocator.ipt and all(torch.isfinite(v).all() for v in allocator.exp_avg_ipt.values())
    assert all(torch.isfinite(v).all() for v in allocator.exp_avg_unc.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adalora_hook_unscales_gradients_that_the_fused_step_received_scaled():
    model = build_peft_model(tiny_bert(), "adalora", r=2, total_steps=10, tinit=2, tfinal=4, deltaT=1)
    budget = AdaLoraBudget()
    budget._model = model
    budget._state = type("State", (), {"step": 0})()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.full_like(p, 1024.0)
    optimizer = type("Optimizer", (), {"grad_scale": torch.tensor(1024.0)})()
    budget.allocate(optimizer)
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in trainable)
    assert not budget.skipped_steps


def test_kbit_device_map_uses_this_process_gpu(monkeypatch):
    assert kbit_device_map() == {"": "cpu"}  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")

    class Rank1:
        local_process_index = 1

    import accelerate

    monkeypatch.setattr(accelerate, "PartialState", lambda: Rank1())
    assert kbit_device_map() == {"": 1}  # the second process's own GPU, not cuda:0


def test_4bit_compute_dtype_follows_the_kits_precision_choice(monkeypatch):
    """On a T4, torch.cuda.is_bf16_supported() says True through emulation; the kit picks fp16 there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert bnb_4bit_config().bnb_4bit_compute_dtype == torch.float16
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: True
    )  # Ampere and newer
    assert bnb_4bit_config().bnb_4bit_compute_dtype == torch.bfloat16
    assert dtype_of_precision("no") == torch.float32
    with pytest.raises(MfkitError, match="precision"):
        dtype_of_precision("fp8")


def test_prepare_kbit_model_leaves_gradient_checkpointing_off():
    model = prepare_kbit_model(tiny_llama())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())  # the base is frozen, adapters come next
