import json

import pytest
import torch
from helpers import oracle_head, random_head, tiny_target

from eaglespec.draft import DraftHead, DraftHeadError
from eaglespec.drafter import EagleDrafter, TreeConfig
from eaglespec.generate import GenerationConfig, Generator

OFFICIAL_KEYS = {
    "fc.weight", "fc.bias",
    "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
}


def test_checkpoint_is_the_official_eagle_format(tmp_path):
    from safetensors.torch import load_file

    target = tiny_target()
    head = random_head(target)
    head.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["bias"] is True
    assert config["hidden_size"] == target.hidden_size
    assert set(load_file(str(tmp_path / "model.safetensors"))) == OFFICIAL_KEYS
    again = DraftHead.from_pretrained(tmp_path)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


def test_a_two_layer_head_round_trips_with_the_official_layer_keys(tmp_path):
    from safetensors.torch import load_file

    from eaglespec.draft import head_config_from_target

    target = tiny_target()
    torch.manual_seed(0)
    head = DraftHead(head_config_from_target(target.config, num_layers=2))
    head.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    # layers after the first carry input_layernorm, as the official EAGLE code builds them
    second = {k.replace("layers.0.", "layers.1.") for k in OFFICIAL_KEYS if k.startswith("layers.0.")}
    assert set(load_file(str(tmp_path / "model.safetensors"))) == OFFICIAL_KEYS | second | {"layers.1.input_layernorm.weight"}
    again = DraftHead.from_pretrained(tmp_path)
    feats = torch.randn(1, 5, target.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(again(feats, feats, torch.arange(5)[None]), head(feats, feats, torch.arange(5)[None]))


def test_reads_pytorch_model_bin_and_ignores_official_extras(tmp_path):
    target = tiny_target()
    head = random_head(target)
    head.save_pretrained(tmp_path)
    state = {k: v for k, v in head.state_dict().items() if k in OFFICIAL_KEYS}
    state["embed_tokens.weight"] = torch.zeros(target.vocab_size, target.hidden_size)  # some official heads carry it
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    again = DraftHead.from_pretrained(tmp_path)
    torch.testing.assert_close(again.fc.weight, head.fc.weight)


def test_head_that_does_not_fit_is_refused_naming_both_shapes(tmp_path):
    small = tiny_target(hidden=64)
    big = tiny_target(hidden=96)
    random_head(big).save_pretrained(tmp_path)
    head = DraftHead.from_pretrained(tmp_path)
    with pytest.raises(DraftHeadError) as e:
        EagleDrafter.from_head(head, small, TreeConfig())
    assert "[96, 192]" in str(e.value) and "[64, 128]" in str(e.value)


def test_missing_and_corrupt_heads(tmp_path):
    with pytest.raises(DraftHeadError):
        DraftHead.from_pretrained(tmp_path / "nowhere")
    head = random_head(tiny_target())
    head.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["fc.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(DraftHeadError, match="fc.bias"):
        DraftHead.from_pretrained(tmp_path)


def test_reduced_vocab_head_round_trips_and_stays_lossless(tmp_path):
    target = tiny_target(copyable=True, logit_scale=30.0)
    head = oracle_head(target, noise=0.2)
    keep = torch.arange(0, target.vocab_size, 2)  # half the vocabulary
    head.set_vocab(keep)
    head.save_pretrained(tmp_path)
    again = DraftHead.from_pretrained(tmp_path)
    assert again.reduced_vocab
    assert again.draft_token_ids().tolist() == keep.tolist()
    assert again.t2d.sum() == keep.numel()

    plain = Generator(target)
    cfg = GenerationConfig(max_new_tokens=48, ignore_eos=True)
    for kind in ("static", "dynamic"):
        spec = Generator(target, EagleDrafter.from_head(again, target, TreeConfig(kind=kind)))
        g = torch.Generator().manual_seed(5)
        proposed = set()
        for _ in range(6):
            p = torch.randint(2, target.vocab_size, (8,), generator=g)
            want = [t for c in plain.generate_ids(p, cfg) for t in c]
            got = [t for c in spec.generate_ids(p, cfg) for t in c]
            assert got == want
        tree = spec.drafter.propose(torch.tensor([3]))  # fresh proposal after a generate
        proposed.update(tree.tokens[1:].tolist())
        assert proposed <= set(keep.tolist())  # only draft-vocabulary tokens are ever guessed


@pytest.mark.parametrize("config, words", [
    ({"hidden_size": 7}, "hidden_size (7)"),
    ({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 3}, "config"),
    ({"hidden_size": 64, "num_attention_heads": 4, "vocab_size": -5}, "config"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ([1, 2], "JSON object"),
])
def test_an_invalid_config_is_one_clear_error(tmp_path, capsys, tiny_model_dir, config, words):
    """Any config a head cannot be built from is a DraftHeadError of one line, which the CLI prints
    as one line with exit status 2 (not a traceback from transformers' validation)."""
    from safetensors.torch import save_file

    from eaglespec.cli import main

    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"fc.bias": torch.zeros(2)}, str(tmp_path / "model.safetensors"))  # the config is what fails
    with pytest.raises(DraftHeadError) as e:
        DraftHead.from_pretrained(tmp_path)
    assert words in str(e.value) and "\n" not in str(e.value)
    code = main(["generate", "hi", "--model", str(tiny_model_dir), "--draft", str(tmp_path), "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("eaglespec: error:") and err.count("\n") == 1 and words in err
