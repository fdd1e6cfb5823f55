"""Foreign adapter files load exactly (issue 13.A): diffusers/PEFT files with lora_alpha != r (written by
diffusers' and PEFT's own save code), official-repo LoRAs (config_lora.json, trigger), ComfyUI-trained files
(lora_up/lora_down/alpha + diff + diff_b on every layer, byte for byte as comfy_extras/nodes_train.py writes
them), LyCORIS LoHa / LoKr files; every key that cannot be applied is an error naming it.

ΔW references are computed independently: PEFT's own ``get_delta_weight`` for PEFT files, and the formulas of
docs/lora_formats.md (ComfyUI's weight_adapter maths) written out here for the others.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kandinsky5.configs import get_task
from kandinsky5.model.dit import DiT
from networks.adapters import AdapterKeyError
from networks.lora_kandinsky import create_network_from_weights, main, read_adapter
from tests.helpers import tiny_dit_inputs, tiny_random_dit

TINY = get_task("k5-tiny-t2v").dit
BLOCK = "visual_transformer_blocks.0"


@pytest.fixture(scope="module")
def dit() -> DiT:
    return tiny_random_dit()


@pytest.fixture(scope="module")
def inputs() -> tuple:
    return tiny_dit_inputs()


def _forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs, torch.tensor([500.0]))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _load(path, dit):
    adapter = read_adapter(path)
    return adapter, create_network_from_weights(1.0, adapter.sd, dit, True, adapter.metadata, adapter.origins)


# ----------------------------------------------------------------------------------------------------------------
# diffusers / PEFT (their own save code)
# ----------------------------------------------------------------------------------------------------------------


def _peft_model(config_kwargs):
    pytest.importorskip("peft")
    from peft import LoraConfig

    from tests.helpers import diffusers_dit

    torch.manual_seed(3)
    model = diffusers_dit(TINY)
    config = LoraConfig(init_lora_weights=False, **config_kwargs)
    model.add_adapter(config)
    return model, config


def _peft_deltas(model) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {n: m.get_delta_weight("default") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize(
    "config_kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["to_query", "to_key", "in_layer"]),  # alpha = 2r, embeddings too
        dict(
            r=4,
            lora_alpha=3,
            target_modules=["to_value", "feed_forward.out_layer"],
            rank_pattern={"out_layer": 2},
            alpha_pattern={"feed_forward.out_layer": 7},
            use_rslora=True,
        ),  # fmt: skip
    ],
)
def test_diffusers_pipeline_file_with_lora_adapter_metadata(tmp_path, dit, config_kwargs):
    from diffusers.loaders.lora_pipeline import KandinskyLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    model, config = _peft_model(config_kwargs)
    KandinskyLoraLoaderMixin.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
        transformer_lora_adapter_metadata=config.to_dict(),
    )  # fmt: skip
    _, net = _load(tmp_path / "pytorch_lora_weights.safetensors", dit)
    reference = _peft_deltas(model)
    assert set(net.names) == set(reference)
    for name, module in net.items():
        assert _rel(module.delta_weight(), reference[name]) <= 1e-5, name


def test_diffusers_model_level_file_unprefixed_metadata(tmp_path, dit):
    model, _ = _peft_model(dict(r=2, lora_alpha=16, target_modules=["to_query"]))
    model.save_lora_adapter(tmp_path)
    files = list(tmp_path.glob("*.safetensors"))
    _, net = _load(files[0], dit)
    reference = _peft_deltas(model)
    assert len(net) == len(reference) == 9  # to_query of 1 text + 4 visual blocks (self and cross)
    for name, module in net.items():
        assert _rel(module.delta_weight(), reference[name]) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# official repo: config_lora.json beside the weights, trigger metadata
# ----------------------------------------------------------------------------------------------------------------


def _official_files(folder, prefix: str = "base_model.model.", targets=("to_query", "to_value")):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(4)
    paths = [f"{BLOCK}.self_attention.to_query", f"{BLOCK}.cross_attention.to_value"]
    sd = {}
    for p in paths:
        sd[f"{prefix}{p}.lora_A.default.weight"] = torch.randn(4, 128, generator=g)
        sd[f"{prefix}{p}.lora_B.default.weight"] = torch.randn(128, 4, generator=g)
    save_file(sd, str(folder / "lora.safetensors"), metadata={"trigger": "k5style, "})
    (folder / "config_lora.json").write_text(json.dumps({"r": 4, "lora_alpha": 12, "target_modules": list(targets)}))
    return sd, paths


@pytest.mark.parametrize("as_directory", [True, False])
def test_official_lora_alpha_targets_and_trigger(tmp_path, dit, as_directory):
    sd, paths = _official_files(tmp_path / "repo")
    adapter, net = _load(tmp_path / "repo" if as_directory else tmp_path / "repo" / "lora.safetensors", dit)
    assert adapter.trigger == "k5style, " and adapter.config_path == tmp_path / "repo" / "config_lora.json"
    for p in paths:
        a, b = sd[f"base_model.model.{p}.lora_A.default.weight"], sd[f"base_model.model.{p}.lora_B.default.weight"]
        assert _rel(net[p].delta_weight(), 3.0 * b @ a) <= 1e-6  # lora_alpha / r = 12 / 4


def test_official_key_outside_target_modules_is_an_error(tmp_path, dit):
    _official_files(tmp_path / "repo", targets=("to_query",))
    with pytest.raises(ValueError, match=r"cross_attention\.to_value\.lora_A\.default\.weight.*target_modules"):
        read_adapter(tmp_path / "repo")


def test_generator_prepends_the_trigger():
    from kandinsky5.sampling.prompts import prepend_trigger

    assert prepend_trigger("k5style, ", "a cat") == "k5style, a cat"
    assert prepend_trigger("k5style", "a cat") == "k5style a cat"
    assert prepend_trigger("k5style", "k5style a cat") == "k5style a cat"


# ----------------------------------------------------------------------------------------------------------------
# ComfyUI-trained files (comfy_extras/nodes_train.py): every layer with a weight, diff for 1-D, diff_b for biases
# ----------------------------------------------------------------------------------------------------------------


def _comfyui_trained_file(dit: DiT, dtype=torch.bfloat16, rank: int = 2) -> dict[str, torch.Tensor]:
    """As ComfyUI's trainer saves it: ``diffusion_model.<module>.`` + the adapter's parameter names (``lora_up`` /
    ``lora_down`` / ``alpha`` for weights with >= 2 dims, ``diff`` for 1-D weights) and ``diff_b`` for biases,
    every tensor cast to the training dtype (alpha included).  Random values stand in for trained ones."""
    g = torch.Generator().manual_seed(6)
    sd = {}
    for name, module in dit.named_modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        key = f"diffusion_model.{name}"
        if isinstance(weight, torch.nn.Parameter):
            if weight.ndim >= 2:
                sd[f"{key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g) * 0.05
                sd[f"{key}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=g) * 0.05
                sd[f"{key}.alpha"] = torch.tensor(1.0)
            else:
                sd[f"{key}.diff"] = torch.randn(weight.shape, generator=g) * 0.01
        if isinstance(bias, torch.nn.Parameter):
            sd[f"{key}.diff_b"] = torch.randn(bias.shape, generator=g) * 0.01
    return {k: v.to(dtype) for k, v in sd.items()}


def _comfyui_patched(dit: DiT, sd: dict[str, torch.Tensor]) -> DiT:
    """ComfyUI's calculate_weight for these patches: W += alpha/rank * up @ down; W += diff; b += diff_b."""
    import copy

    out = copy.deepcopy(dit)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for key, t in sd.items():
            module = key.removeprefix("diffusion_model.").rsplit(".", 2 if "lora_" in key else 1)[0]
            if key.endswith(".lora_up.weight"):
                down, alpha = sd[f"diffusion_model.{module}.lora_down.weight"], sd[f"diffusion_model.{module}.alpha"]
                params[f"{module}.weight"] += (float(alpha) / down.shape[0]) * (t.float() @ down.float())
            elif key.endswith(".diff"):
                params[f"{module}.weight"] += t.float()
            elif key.endswith(".diff_b"):
                params[f"{module}.bias"] += t.float()
    return out


def test_comfyui_trained_file_merge_and_runtime_match_comfyui(tmp_path, dit, inputs):
    sd = _comfyui_trained_file(dit)
    save_file(sd, str(tmp_path / "comfy.safetensors"))
    reference = _forward(_comfyui_patched(dit, sd), inputs)
    assert _rel(reference, _forward(dit, inputs)) > 1e-3  # the patches do change the output
    import copy

    merged = copy.deepcopy(dit)
    _, net = _load(tmp_path / "comfy.safetensors", merged)
    kinds = {m.kind for m in net.lora_modules}
    assert kinds == {"lora", "diff"} and any(n.startswith("out_layer.") for n in net.names)
    net.merge_into(merged)
    assert _rel(_forward(merged, inputs), reference) <= 1e-5
    runtime = copy.deepcopy(dit)
    _, net = _load(tmp_path / "comfy.safetensors", runtime)
    net.apply_to(runtime)
    assert _rel(_forward(runtime, inputs), reference) <= 1e-4  # whole model (q/k are rounded to bf16 after RoPE)
    net.remove()
    assert torch.equal(_forward(runtime, inputs), _forward(dit, inputs))  # parameters never touched


def test_comfyui_norm_diff_trains_through_the_swap(dit, inputs):
    """diff on the q/k RMSNorm weights (read as tensors by the DiT) gets gradients in runtime mode."""
    import copy

    from networks.adapters import TensorDiff
    from networks.lora import LoRANetwork

    model = copy.deepcopy(dit)
    path = f"{BLOCK}.self_attention.query_norm"
    net = LoRANetwork(model, modules=[(path, TensorDiff(path, "diff", (64,)))])
    net.apply_to(model)
    model(*inputs, torch.tensor([500.0])).square().mean().backward()
    assert net.lora_modules[0].diff.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# LyCORIS LoHa / LoKr files (kohya-style lora_unet_, SimpleTuner lycoris_, ComfyUI diffusion_model.)
# ----------------------------------------------------------------------------------------------------------------


def _loha_ref(t: dict, alpha: float) -> torch.Tensor:
    return (alpha / t["hada_w1_b"].shape[0]) * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])


def _lokr_ref(t: dict, alpha: float | None) -> torch.Tensor:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2)


LYCORIS_CASES = {
    "loha": ({"hada_w1_a": (128, 4), "hada_w1_b": (4, 128), "hada_w2_a": (128, 4), "hada_w2_b": (4, 128)}, 2.0),
    "lokr_full": ({"lokr_w1": (8, 8), "lokr_w2": (16, 16)}, 5.0),  # two full factors: alpha is not used
    "lokr_w2_factored": ({"lokr_w1": (8, 8), "lokr_w2_a": (16, 3), "lokr_w2_b": (3, 16)}, 6.0),
    "lokr_both": ({"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (32, 3), "lokr_w2_b": (3, 32)}, 1.5),
}


@pytest.mark.parametrize("prefix", ["lora_unet_", "lycoris_", "diffusion_model."])
@pytest.mark.parametrize("case", sorted(LYCORIS_CASES))
def test_lycoris_files_give_comfyui_delta(tmp_path, dit, case, prefix):
    shapes, alpha = LYCORIS_CASES[case]
    g = torch.Generator().manual_seed(8)
    path = f"{BLOCK}.cross_attention.to_key"
    name = prefix + (path.replace(".", "_") if prefix != "diffusion_model." else path)
    tensors = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    save_file({**{f"{name}.{k}": v for k, v in tensors.items()}, f"{name}.alpha": torch.tensor(alpha)},
              str(tmp_path / "ly.safetensors"))  # fmt: skip
    _, net = _load(tmp_path / "ly.safetensors", dit)
    ref = _loha_ref(tensors, alpha) if case == "loha" else _lokr_ref(tensors, alpha)
    assert _rel(net[path].delta_weight(), ref) <= 1e-5
    x = torch.randn(3, 128, generator=g)
    assert _rel(net[path].branch(x), x @ ref.T) <= 1e-5  # runtime branch == merged ΔW


# ----------------------------------------------------------------------------------------------------------------
# keys that cannot be applied
# ----------------------------------------------------------------------------------------------------------------

_GOOD = {f"diffusion_model.{BLOCK}.self_attention.to_key.lora_down.weight": torch.zeros(2, 128),
         f"diffusion_model.{BLOCK}.self_attention.to_key.lora_up.weight": torch.zeros(128, 2)}  # fmt: skip


@pytest.mark.parametrize(
    "extra, message",
    [
        ({f"diffusion_model.{BLOCK}.self_attention.to_key.dora_scale": torch.ones(128, 1)}, "DoRA"),
        ({f"diffusion_model.{BLOCK}.self_attention.to_key.lora_mid.weight": torch.ones(2, 2)}, "convolutions"),
        (
            {
                f"diffusion_model.{BLOCK}.nothing.lora_down.weight": torch.ones(2, 128),
                f"diffusion_model.{BLOCK}.nothing.lora_up.weight": torch.ones(128, 2),
            },
            "does not exist",
        ),  # fmt: skip
        (
            {
                f"diffusion_model.{BLOCK}.self_attention.to_query.lora_down.weight": torch.ones(2, 64),
                f"diffusion_model.{BLOCK}.self_attention.to_query.lora_up.weight": torch.ones(128, 2),
            },
            "do not fit",
        ),  # fmt: skip
        ({f"diffusion_model.{BLOCK}.self_attention.key_norm.diff": torch.ones(65)}, "shape"),
        ({f"diffusion_model.{BLOCK}.feed_forward.in_layer.diff_b": torch.ones(512)}, "has no bias"),
        ({f"diffusion_model.{BLOCK}.self_attention.to_value.alpha": torch.tensor(1.0)}, "no adapter tensors"),
        ({f"diffusion_model.{BLOCK}.self_attention.to_key.hada_w1_a": torch.ones(128, 2)}, "several adapter kinds"),
        ({f"diffusion_model.{BLOCK}.self_attention.to_key.weird": torch.ones(1)}, "unrecognised"),
    ],
)
def test_every_unapplied_key_is_an_error_naming_it(tmp_path, dit, extra, message):
    save_file({**_GOOD, **extra}, str(tmp_path / "bad.safetensors"))
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with pytest.raises(ValueError, match=message) as info:
        _load(tmp_path / "bad.safetensors", dit)
    bad_key = next(iter(extra))
    assert bad_key in str(info.value) or (isinstance(info.value, AdapterKeyError) and info.value.key in extra)
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


def test_converter_keeps_comfyui_deltas_and_refuses_diffusers_for_them(tmp_path, dit, capsys):
    sd = _comfyui_trained_file(dit, torch.float32)
    save_file(sd, str(tmp_path / "comfy.safetensors"))
    assert main(["convert", str(tmp_path / "comfy.safetensors"), str(tmp_path / "musubi.safetensors"),
                 "--format", "musubi"]) == 0  # fmt: skip
    a, _ = read_adapter(tmp_path / "comfy.safetensors").sd, None
    b = read_adapter(tmp_path / "musubi.safetensors").sd
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from kandinsky5.common import run_cli

    assert run_cli(main, ["convert", str(tmp_path / "comfy.safetensors"), str(tmp_path / "d.safetensors"),
                          "--format", "diffusers"]) == 1  # fmt: skip
    assert "holds LoRA tensors only" in capsys.readouterr().err and not (tmp_path / "d.safetensors").exists()
