"""Every refusal of a bad adapter: EngineError INVALID_ARG naming the adapter and the problem."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from adapter_helpers import MAX_RANK, MakeAdapter, recipe
from safetensors.torch import load_file, save_file

from slora_backend.adapters import AdapterSource
from slora_backend.adapters.source import CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE
from slora_backend.adapters.validation import TARGET_REGEX_BUDGET_S, adapter_numel, tensor_key
from slora_backend.errors import EngineError, ErrorCode
from slora_backend.model.spec import MODULE_ORDER, ModelSpec

Edit = Callable[[dict[str, torch.Tensor]], None]
Q_A = tensor_key(0, "q_proj", "A")
Q_B = tensor_key(0, "q_proj", "B")


def _set(key: str, value: torch.Tensor) -> Edit:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = value
    return edit


def _drop(key: str) -> Edit:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[key]
    return edit


def _retype(key: str, dtype: torch.dtype) -> Edit:
    def edit(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].to(dtype)
    return edit


CONFIG_REFUSALS = [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["embed_tokens"]}, "embedding LoRA"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head LoRA"),
    ({"target_modules": r"model\.embed_tokens|.*q_proj"}, "embedding LoRA"),
    ({"bias": "all"}, "bias='all'"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 4}}, "alpha_pattern"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"layers_pattern": "layers"}, "layers_pattern"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"peft_type": None}, "peft_type None"),
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"init_lora_weights": "pissa"}, "pissa"),
    ({"init_lora_weights": "olora"}, "olora"),
    ({"loftq_config": {"loftq_bits": 4}}, "loftq_config"),
    ({"use_qalora": True}, "use_qalora"),
    ({"exclude_modules": ["q_proj"]}, "exclude_modules"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices"),
    ({"target_parameters": ["mlp.experts"]}, "target_parameters"),
    ({"r": 0}, "'r' must be an integer >= 1"),
    ({"r": 8.5}, "'r' must be an integer >= 1"),
    ({"r": "8"}, "'r' must be an integer >= 1"),
    ({"lora_alpha": "16"}, "'lora_alpha' must be a finite number"),
    ({"lora_alpha": math.inf}, "'lora_alpha' must be a finite number"),
    ({"use_rslora": "yes"}, "'use_rslora' must be true or false"),
    ({"target_modules": None}, "no 'target_modules'"),
    ({"target_modules": []}, "non-empty list"),
    ({"target_modules": ["q_proj", 3]}, "non-empty list"),
    ({"target_modules": ["q_proj", "foo_proj"]}, "'foo_proj' does not exist"),
    ({"target_modules": ["self_attn"]}, "not a linear projection"),
    ({"target_modules": "(unclosed"}, "regex '(unclosed' is invalid"),
    ({"target_modules": r".*\.nothing_here"}, "does not exist in the base model"),
    ({"target_modules": r"model\.layers\.0\.self_attn\.(q_proj|v_proj)"}, "layer-selective"),
    ({"target_modules": ["layers.0.self_attn.q_proj", "v_proj"]}, "layer-selective"),
]


def assert_refused(source: AdapterSource, adapter_id: str, needle: str) -> None:
    """Loading is INVALID_ARG naming the adapter and saying `needle`."""
    with pytest.raises(EngineError) as info:
        source.load(adapter_id)
    assert info.value.code == ErrorCode.INVALID_ARG
    assert f"adapter '{adapter_id}'" in info.value.message
    assert needle in info.value.message


@pytest.mark.parametrize(("updates", "needle"), CONFIG_REFUSALS,
                         ids=[f"{i}-{next(iter(u))}" for i, (u, _) in enumerate(CONFIG_REFUSALS)])
def test_config_refusals(make_adapter: MakeAdapter, source: AdapterSource, updates: dict,
                         needle: str) -> None:
    make_adapter("bad", config_updates=updates)
    assert_refused(source, "bad", needle)


# values (NaN / Inf) are checked by the pool tier after its copy: tests/adapters/test_pool_copy.py
TENSOR_REFUSALS = [
    (_set(Q_A, torch.zeros(8, 63)), "has shape [8, 63], expected [8, 64]"),
    (_set(Q_B, torch.zeros(64, 4)), "has shape [64, 4], expected [64, 8]"),
    (_set(Q_A, torch.zeros(8, 64, 1)), "has shape [8, 64, 1]"),
    (_drop(tensor_key(1, "v_proj", "A")), "missing tensor"),
    (_set(tensor_key(0, "k_proj", "A"), torch.zeros(8, 64)), "target_modules does not list"),
    (_set(tensor_key(2, "q_proj", "A"), torch.zeros(8, 64)), "base model has 2 layers"),
    (_set("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
          torch.ones(64)), "DoRA"),
    (_set("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(8, 10)),
     "embedding LoRA"),
    (_set("base_model.model.lm_head.lora_A.weight", torch.zeros(8, 64)), "lm_head LoRA"),
    (_set("base_model.model.model.norm.modules_to_save.default.weight", torch.ones(64)),
     "modules_to_save"),
    (_set("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", torch.ones(64)),
     "lora_bias"),
    (_retype(Q_A, torch.int32), "dtype I32"),
]


@pytest.mark.parametrize(("edit", "needle"), TENSOR_REFUSALS,
                         ids=[f"{i}" for i in range(len(TENSOR_REFUSALS))])
def test_tensor_refusals(make_adapter: MakeAdapter, source: AdapterSource, edit: Edit,
                         needle: str) -> None:
    make_adapter("bad", tensor_edit=edit)
    assert_refused(source, "bad", needle)


def test_rank_above_max_rank_refused(make_adapter: MakeAdapter, source: AdapterSource) -> None:
    make_adapter("big", recipe(rank=MAX_RANK * 2, alpha=8.0))
    with pytest.raises(EngineError, match="r=128 exceeds the server's max_rank=64") as info:
        source.load("big")
    assert info.value.code == ErrorCode.INVALID_ARG


def test_pickle_weights_refused(make_adapter: MakeAdapter, source: AdapterSource) -> None:
    folder = make_adapter("pickled")
    (folder / WEIGHTS_FILE).unlink()
    torch.save({"x": torch.zeros(1)}, folder / PICKLE_WEIGHTS_FILE)
    with pytest.raises(EngineError, match="adapter_model.bin .pickle.* refused") as info:
        source.load("pickled")
    assert info.value.code == ErrorCode.INVALID_ARG


def test_missing_weights_refused(make_adapter: MakeAdapter, source: AdapterSource) -> None:
    (make_adapter("noweights") / WEIGHTS_FILE).unlink()
    with pytest.raises(EngineError, match="adapter_model.safetensors is missing"):
        source.load("noweights")


def test_corrupt_safetensors_refused(make_adapter: MakeAdapter, source: AdapterSource) -> None:
    (make_adapter("corrupt") / WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(EngineError, match="not a valid safetensors file") as info:
        source.load("corrupt")
    assert info.value.code == ErrorCode.INVALID_ARG


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe"])
def test_bad_config_json_refused(make_adapter: MakeAdapter, source: AdapterSource,
                                 text: str) -> None:
    (make_adapter("badjson") / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(EngineError, match="adapter 'badjson'.*(JSON|JSON object)") as info:
        source.load("badjson")
    assert info.value.code == ErrorCode.INVALID_ARG


def test_huge_config_refused(make_adapter: MakeAdapter, source: AdapterSource) -> None:
    (make_adapter("huge") / CONFIG_FILE).write_text(" " * (2 << 20) + "{}")
    with pytest.raises(EngineError, match="larger than"):
        source.load("huge")


def test_missing_adapter_is_not_found(source: AdapterSource, adapter_dir: Path) -> None:
    with pytest.raises(EngineError) as info:
        source.load("nope")
    assert info.value.code == ErrorCode.NOT_FOUND and "'nope'" in info.value.message
    (adapter_dir / "empty").mkdir()  # a folder without adapter_config.json is no adapter
    with pytest.raises(EngineError) as info:
        source.load("empty")
    assert info.value.code == ErrorCode.NOT_FOUND
    assert source.list_adapters() == []


@pytest.mark.parametrize("form", ["list", "regex", "all-linear"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_valid_adapter_matches_file_and_scale(make_adapter: MakeAdapter, source: AdapterSource,
                                              spec: ModelSpec, form: str,
                                              use_rslora: bool) -> None:
    modules = MODULE_ORDER if form == "all-linear" else ("k_proj", "o_proj", "down_proj")
    folder = make_adapter("good", recipe(rank=16, modules=modules, alpha=24.0,
                                         use_rslora=use_rslora, target_form=form))
    adapter = source.load("good")
    expected_scale = 24.0 / math.sqrt(16) if use_rslora else 24.0 / 16
    assert adapter.scale == pytest.approx(expected_scale, rel=1e-12)
    assert adapter.rank == 16 and adapter.modules == modules
    on_disk = load_file(str(folder / WEIGHTS_FILE))
    assert set(adapter.weights) == {(i, m) for i in range(spec.num_layers) for m in modules}
    for (layer, module), (a, b) in adapter.weights.items():
        assert torch.equal(a, on_disk[tensor_key(layer, module, "A")])
        assert torch.equal(b, on_disk[tensor_key(layer, module, "B")])
        assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert adapter.nbytes == sum(t.numel() * 4 for t in on_disk.values())


def test_suffix_targets_and_fp16_file_are_accepted(make_adapter: MakeAdapter,
                                                   source: AdapterSource) -> None:
    # PEFT matches list entries as dotted suffixes; a bf16 file is converted to the model dtype
    folder = make_adapter("suffix", config_updates={
        "target_modules": ["self_attn.q_proj", "mlp.up_proj"]},
        adapter_recipe=recipe(modules=("q_proj", "up_proj")))
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    adapter = source.load("suffix")
    assert adapter.modules == ("q_proj", "up_proj")
    a, _ = adapter.weights[(1, "up_proj")]
    assert a.dtype == torch.float32
    assert torch.equal(a, tensors[tensor_key(1, "up_proj", "A")].float())


def test_inspect_reads_no_weights_but_validates(make_adapter: MakeAdapter,
                                                source: AdapterSource) -> None:
    make_adapter("ok", recipe(rank=4, modules=("gate_proj",)))
    info = source.inspect("ok")
    assert info.settings.rank == 4 and info.settings.modules == ("gate_proj",)
    assert info.nbytes == 2 * (4 * 64 + 128 * 4) * 4  # 2 layers, A [4, 64] + B [128, 4], fp32
    make_adapter("bad", config_updates={"use_dora": True})
    with pytest.raises(EngineError, match="use_dora"):
        source.inspect("bad")


@pytest.mark.parametrize("modules", [("q_proj",), ("k_proj", "v_proj", "down_proj"),
                                     tuple(MODULE_ORDER)])
def test_adapter_numel_counts_the_files_elements(make_adapter: MakeAdapter, source: AdapterSource,
                                                 modules: tuple[str, ...]) -> None:
    """Counted from the config alone, it equals the elements of the tensors in the file."""
    folder = make_adapter("n", recipe(rank=8, modules=modules))
    settings = source.inspect("n").settings
    in_file = sum(t.numel() for t in load_file(str(folder / WEIGHTS_FILE)).values())
    assert adapter_numel(settings, source.spec) == in_file


@pytest.mark.parametrize("text", ["[" * 100_000, '{"peft_type": "LORA", "r": ' + "9" * 5000 + "}"],
                         ids=["deep", "huge-int"])
def test_hostile_config_json_refused(make_adapter: MakeAdapter, source: AdapterSource,
                                     text: str) -> None:
    (make_adapter("hostile") / CONFIG_FILE).write_text(text)
    with pytest.raises(EngineError, match="adapter 'hostile'") as info:
        source.inspect("hostile")
    assert info.value.code == ErrorCode.INVALID_ARG


def test_backtracking_target_regex_is_bounded(make_adapter: MakeAdapter,
                                              source: AdapterSource) -> None:
    folder = make_adapter("regex")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**cfg, "target_modules": r"(?:.|.){0,40}\d"}))
    start = time.monotonic()
    with pytest.raises(EngineError, match="adapter 'regex'.*takes longer than"):
        source.inspect("regex")
    assert time.monotonic() - start < 20 * TARGET_REGEX_BUDGET_S  # std re: minutes


def test_fifo_weights_refused_without_blocking(make_adapter: MakeAdapter,
                                               source: AdapterSource) -> None:
    folder = make_adapter("fifo")
    (folder / WEIGHTS_FILE).unlink()
    os.mkfifo(folder / WEIGHTS_FILE)
    with pytest.raises(EngineError, match="adapter 'fifo'.*not a regular file"):
        source.inspect("fifo")
