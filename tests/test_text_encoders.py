"""Text encoders on the tiny offline bundle: templates and crop, masks, batching, truncation, CLIP pooling, errors."""

from __future__ import annotations

import shutil

import pytest
import torch

from kandinsky5.common import UserError
from kandinsky5.model.text_encoders import QWEN_TEMPLATES, TextEmbeds, TextEncoder

PROMPTS = ["a red square", "A golden retriever runs along a sandy beach at sunset, the camera follows it."]


@pytest.fixture(scope="module")
def encoder(tiny_bundle) -> TextEncoder:
    return TextEncoder.load(tiny_bundle / "text_encoder", tiny_bundle / "text_encoder2", dtype=torch.float32)


def _ids(encoder: TextEncoder, text: str) -> list[int]:
    return encoder.qwen_tokenizer(text)["input_ids"]


# -- templates / crop ------------------------------------------------------------------------------------------


def test_templates_are_verbatim():
    assert set(QWEN_TEMPLATES) == {"video", "image2video", "image"}
    for text in QWEN_TEMPLATES.values():
        assert text.count("{}") == 1 and text.endswith("<|im_start|>user\n{}<|im_end|>")
        assert text.startswith("<|im_start|>system\nYou are a promt engineer.")  # the authors' typo, kept
    assert "video game or scren content." in QWEN_TEMPLATES["video"]
    assert "Describe main characters actions." in QWEN_TEMPLATES["image2video"]
    assert "Describe the location of the video" not in QWEN_TEMPLATES["image2video"]
    assert QWEN_TEMPLATES["video"].count("\n") == 9 and QWEN_TEMPLATES["image"].count("\n") == 3


@pytest.mark.parametrize("template", list(QWEN_TEMPLATES))
def test_crop_is_the_template_prefix(encoder, template):
    crop = encoder.crop_start(template)
    prefix = QWEN_TEMPLATES[template].split("{}")[0]
    assert crop == len(_ids(encoder, prefix)) > 10
    full = _ids(encoder, QWEN_TEMPLATES[template].format(PROMPTS[1]))
    assert full[:crop] == _ids(encoder, prefix)  # no BPE merge across the prefix boundary
    assert full[crop:] == _ids(encoder, PROMPTS[1] + "<|im_end|>")  # what is kept: the prompt and <|im_end|>


def test_unknown_template(encoder):
    with pytest.raises(UserError, match="unknown prompt template"):
        encoder.encode(["x"], template="audio")


# -- Qwen output -----------------------------------------------------------------------------------------------


def test_embeds_are_last_hidden_state_rows_after_crop(encoder, tiny_bundle):
    """Equal to the *full* Qwen2.5-VL model's hidden_states[-1][:, crop:] (incl. the trailing <|im_end|>)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    full = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_bundle / "text_encoder", dtype=torch.float32)
    out = encoder.encode(PROMPTS[:1])
    ids = torch.tensor([_ids(encoder, QWEN_TEMPLATES["video"].format(PROMPTS[0]))])
    with torch.no_grad():
        ref = full(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, encoder.crop_start("video") :]
    assert out.embeds.shape == ref.shape and out.embeds.dtype == torch.float32
    torch.testing.assert_close(out.embeds, ref, atol=1e-5, rtol=1e-5)
    assert ids[0, -1].item() == encoder.qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_mask_marks_real_tokens(encoder):
    out = encoder.encode(PROMPTS)
    lengths = [len(_ids(encoder, p + "<|im_end|>")) for p in PROMPTS]
    assert out.mask.dtype == torch.bool and out.lengths.tolist() == lengths
    assert out.embeds.shape == (2, max(lengths), 64) and out.pooled.shape == (2, 32)
    for row, n in enumerate(lengths):  # a prefix of True, then False
        assert out.mask[row, :n].all() and not out.mask[row, n:].any()


def test_batch_rows_equal_single_prompt_rows(encoder):
    """Padding never leaks into real tokens (causal LM, right padding).  fp32, different kernel shapes: <= 1e-5."""
    batch = encoder.encode(PROMPTS + ["", "short"])
    for i, prompt in enumerate(PROMPTS + ["", "short"]):
        alone = encoder.encode([prompt])
        emb, pooled = batch.unpadded(i)
        assert emb.shape == alone.embeds[0].shape and alone.mask.all()
        torch.testing.assert_close(emb, alone.embeds[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(pooled, alone.pooled[0], atol=1e-5, rtol=0)


def test_max_length_truncates_after_the_crop(encoder):
    long_prompt = " ".join(["a red square moves"] * 20)
    out = encoder.encode([long_prompt, "hi"], max_length=8)
    assert out.embeds.shape[1] == 8 and out.lengths.tolist() == [8, len(_ids(encoder, "hi<|im_end|>"))]
    expected = _ids(encoder, QWEN_TEMPLATES["video"].format(long_prompt))
    crop = encoder.crop_start("video")
    alone = encoder.encode([long_prompt], max_length=8)
    torch.testing.assert_close(out.embeds[0], alone.embeds[0], atol=1e-5, rtol=0)
    assert len(expected) - crop > 8  # it really was cut


# -- CLIP ------------------------------------------------------------------------------------------------------


def test_clip_pooled_is_pooler_output_at_first_eos(encoder):
    out = encoder.encode(PROMPTS)
    tok = encoder.clip_tokenizer(PROMPTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    assert tok["input_ids"].shape == (2, 77)
    with torch.no_grad():
        ref = encoder.clip(**tok)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=0, rtol=0)
    eos = (tok["input_ids"] == encoder.clip_tokenizer.eos_token_id).int().argmax(dim=1)
    torch.testing.assert_close(out.pooled, ref.last_hidden_state[torch.arange(2), eos], atol=0, rtol=0)
    assert eos.tolist() == [int(m.sum()) - 1 for m in tok["attention_mask"]]  # EOS = last real token


def test_clip_truncates_to_77(encoder):
    out = encoder.encode([" ".join(["word"] * 200)])
    assert out.pooled.shape == (1, 32) and torch.isfinite(out.pooled).all()


# -- container -------------------------------------------------------------------------------------------------


def test_text_embeds_helpers(encoder):
    out = encoder.encode(PROMPTS)
    moved = out.to(dtype=torch.bfloat16)
    assert moved.embeds.dtype == torch.bfloat16 and moved.mask.dtype == torch.bool
    first = out.select(0)
    assert first.embeds.shape[1] == int(out.lengths[0]) and first.mask.all()
    rebuilt = TextEmbeds.pad_stack([out.unpadded(i) for i in range(len(out))])
    for name in ("embeds", "mask", "pooled"):  # exact inverse: encode() already zeroes the padded rows
        assert torch.equal(getattr(rebuilt, name), getattr(out, name)), name
    assert not out.embeds[~out.mask].any()
    with pytest.raises(ValueError):
        TextEmbeds.pad_stack([])


def test_identity(encoder):
    assert encoder.identity == {
        "qwen": "text_encoder",
        "qwen_hidden": "64",
        "clip": "text_encoder2",
        "clip_hidden": "32",
    }


# -- errors ----------------------------------------------------------------------------------------------------


def test_hub_id_without_network_is_one_clear_line(tiny_bundle, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(UserError) as err:
        TextEncoder.load("kandinsky5-tuner-tests/no-such-model", tiny_bundle / "text_encoder2")
    message = str(err.value)
    assert "\n" not in message and "kandinsky5-tuner-tests/no-such-model" in message
    assert "pass a local snapshot directory" in message and "hub id" in message


@pytest.mark.parametrize(
    "qwen, clip, match",
    [
        ("missing", "text_encoder2", "is not a directory"),
        ("text_encoder2", "text_encoder2", "model_type='clip_text_model'"),
        ("text_encoder", "text_encoder", "model_type='qwen2_5_vl'"),
        ("model", "text_encoder2", "has no config.json"),
        ("text_encoder", "vae", "model_type=None"),
    ],
)
def test_bad_local_paths(tiny_bundle, qwen, clip, match):
    with pytest.raises(UserError, match=match) as err:
        TextEncoder.load(tiny_bundle / qwen, tiny_bundle / clip)
    assert "\n" not in str(err.value)


def test_crop_mismatch_warns_for_a_real_looking_qwen_tokenizer(encoder, monkeypatch, caplog):
    monkeypatch.setattr(encoder.qwen_tokenizer, "name_or_path", "/hub/Qwen2.5-VL-7B-Instruct")
    monkeypatch.setattr(encoder, "_crop_cache", {})
    with caplog.at_level("WARNING", logger="kandinsky5.model.text_encoders"):
        crop = encoder.crop_start("image")
    assert crop != 41 and "official code uses 41" in caplog.text


def test_qwen_4bit_loads_and_tracks_bf16(tiny_bundle):
    pytest.importorskip("bitsandbytes")
    quantized = TextEncoder.load(tiny_bundle / "text_encoder", tiny_bundle / "text_encoder2", qwen_4bit=True)
    plain = TextEncoder.load(tiny_bundle / "text_encoder", tiny_bundle / "text_encoder2")
    a, b = quantized.encode(PROMPTS[:1]), plain.encode(PROMPTS[:1])
    assert quantized.qwen_4bit and a.embeds.shape == b.embeds.shape
    cos = torch.nn.functional.cosine_similarity(a.embeds.float().flatten(), b.embeds.float().flatten(), dim=0)
    assert cos > 0.9
    quantized.to("cpu")  # a no-op for the 4-bit model, must not raise


def test_snapshot_missing_weights_is_an_error_not_a_random_init(tiny_bundle, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "clip"
    shutil.copytree(tiny_bundle / "text_encoder2", broken)
    state = load_file(broken / "model.safetensors")
    del state["final_layer_norm.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="lacks 1 weights") as err:
        TextEncoder.load(tiny_bundle / "text_encoder", broken)
    assert "\n" not in str(err.value)
