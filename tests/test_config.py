import json

import pytest

from checkpoints import config
from olmo2_fast.config import PRESETS, Olmo2Config, preset
from olmo2_fast.errors import ConfigError


def hf4_dict(**changes):
    raw = config().to_hf_dict()
    raw.update(changes)
    return raw


def write(tmp_path, raw):
    path = tmp_path / "config.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw))
    return path


def test_round_trip_of_the_transformers_4_layout(tmp_path):
    assert Olmo2Config.from_json_file(write(tmp_path, hf4_dict())) == config()


def test_transformers_5_layout_with_rope_parameters_and_dtype(tmp_path):
    raw = hf4_dict(rope_parameters={"rope_theta": 12345.0, "rope_type": "linear", "factor": 2.0}, dtype="bfloat16")
    for key in ("rope_theta", "rope_scaling", "torch_dtype"):
        raw.pop(key)
    cfg = Olmo2Config.from_json_file(write(tmp_path, raw))
    assert (cfg.rope_theta, cfg.rope_scaling_factor, cfg.torch_dtype) == (12345.0, 2.0, "bfloat16")


@pytest.mark.parametrize("scaling", [{"type": "linear", "factor": 8.0}, {"rope_type": "linear", "factor": 8.0}])
def test_linear_rope_scaling_under_either_key(tmp_path, scaling):
    assert Olmo2Config.from_json_file(write(tmp_path, hf4_dict(rope_scaling=scaling))).rope_scaling_factor == 8.0


def test_derived_fields_and_missing_kv_heads(tmp_path):
    raw = hf4_dict(num_attention_heads=6, hidden_size=48)
    raw.pop("num_key_value_heads")
    cfg = Olmo2Config.from_json_file(write(tmp_path, raw))
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.group_size) == (6, 8, 1)
    assert Olmo2Config.from_dict(hf4_dict(head_dim=16)).head_dim == 16
    assert config(num_attention_heads=40, num_key_value_heads=8, hidden_size=5120).group_size == 5


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="llama"), "not 'olmo2'"),
    (dict(num_attention_heads=5), "does not divide hidden_size"),
    (dict(num_key_value_heads=3), "does not divide num_attention_heads"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
    (dict(rope_scaling={"rope_type": "linear"}), "needs a 'factor'"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be positive"),
    (dict(hidden_size="48"), "hidden_size must be a positive integer"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rms_norm_eps="1e-6"), r"rms_norm_eps must be a number, got '1e-6' \(str\)"),
    (dict(rope_theta="500000"), "rope_theta must be a number"),
    (dict(rope_theta=True), "rope_theta must be a number"),
    (dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "rope scaling factor must be a number"),
    (dict(eos_token_id="0"), "eos_token_id must be a non-negative integer or null, got '0'"),
    (dict(eos_token_id=[0, "1"]), "eos_token_id entry must be a non-negative integer"),
    (dict(eos_token_id=1.5), "eos_token_id must be a non-negative integer"),
    (dict(bos_token_id=-1), "bos_token_id must be a non-negative integer"),
    (dict(pad_token_id=[1]), "pad_token_id must be a non-negative integer"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(torch_dtype=16), "torch_dtype must be a string"),
    (dict(head_dim="16"), "head_dim must be a positive integer"),
])
def test_invalid_configs_are_named(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        Olmo2Config.from_json_file(write(tmp_path, hf4_dict(**changes)))


def test_missing_field_invalid_json_and_missing_file(tmp_path):
    raw = hf4_dict()
    raw.pop("vocab_size")
    with pytest.raises(ConfigError, match="missing required field 'vocab_size'"):
        Olmo2Config.from_json_file(write(tmp_path, raw))
    with pytest.raises(ConfigError, match="not valid JSON"):
        Olmo2Config.from_json_file(write(tmp_path, "{not json"))
    with pytest.raises(ConfigError, match="expected a JSON object"):
        Olmo2Config.from_json_file(write(tmp_path, "[1, 2]"))
    with pytest.raises(ConfigError, match="not found"):
        Olmo2Config.from_json_file(tmp_path / "nope" / "config.json")


def test_presets_match_the_published_models():
    # Weights read per decode token (all linear layers + lm_head) in bf16, from OLMO2_FACTS: 2.56 / 13.8 / 26.4 / 63.4 GB.
    def linear_bytes(cfg):
        return 2 * (cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size
                    - cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.q_width + cfg.kv_width) - cfg.hidden_size)
    expected_gb = {"1b": 2.56, "7b": 13.8, "13b": 26.4, "32b": 63.4}
    for name, gb in expected_gb.items():
        assert linear_bytes(PRESETS[name]) / 1e9 == pytest.approx(gb, rel=0.01), name
    assert preset("32B").group_size == 5 and preset("7b").head_dim == 128
    with pytest.raises(ConfigError, match="unknown model size"):
        preset("70b")


def test_quantization_configs_other_than_ours_are_refused(tmp_path):
    from olmo2_fast.quantization import checkpoint_method
    gptq = Olmo2Config.from_json_file(write(tmp_path, hf4_dict(
        quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})))
    with pytest.raises(ConfigError, match="quant_method 'gptq' is not supported"):
        checkpoint_method(gptq)
    ours = Olmo2Config.from_json_file(write(tmp_path, hf4_dict(
        quantization_config={"quant_method": "olmo2_fast_int4", "bits": 4, "group_size": 128})))
    assert ours.quantization == "olmo2_fast_int4" and checkpoint_method(ours).name == "int4"  # no layout: the first
    assert ours.to_hf_dict()["quantization_config"]["group_size"] == 128
    other_layout = Olmo2Config.from_json_file(write(tmp_path, hf4_dict(
        quantization_config={"quant_method": "olmo2_fast_int4", "group_size": 128, "layout": "future"})))
    with pytest.raises(ConfigError, match="packed as 'future' .* quantise the original checkpoint again"):
        checkpoint_method(other_layout)
    with pytest.raises(ConfigError, match="quantization_config must be an object with a string quant_method"):
        Olmo2Config.from_json_file(write(tmp_path, hf4_dict(quantization_config={"bits": 4})))
