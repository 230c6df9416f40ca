"""Operator mistakes in a model set are refused before tritonserver starts, in one line naming the file and
the problem: each used to crash `serve` with a traceback, name no file, or pass the checks and fail inside
the server as "failed to load all models", the reason buried in its log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from orpheus_triton import cli
from orpheus_triton.demo_models import SNAC_24KHZ_CONFIG, ModelSet
from orpheus_triton.llama import FUSED_PROJECTIONS, Llama, checkpoint_names
from orpheus_triton.prompt import Voices, load_tokenizer
from orpheus_triton.server import Ports


@pytest.fixture
def models(model_set, tmp_path) -> ModelSet:
    """The session's tiny model set, as links in a folder of this test's own: a test breaks a file by
    writing its own in the link's place (copies would be 120 MB a test)."""
    copy = ModelSet(tmp_path / "models")
    for folder in (model_set.llm, model_set.snac):
        (copy.root / folder.name).mkdir(parents=True)
        for file in folder.iterdir():
            (copy.root / folder.name / file.name).symlink_to(file)
    copy.check()  # whole, it passes
    return copy


def _free_port_arguments() -> list[str]:
    ports = Ports.free()
    return ["--grpc-port", str(ports.grpc), "--http-port", str(ports.http), "--metrics-port", str(ports.metrics)]


def replace(path: Path, data: bytes | str | Callable[[bytes], bytes]) -> Path:
    """Write ``data`` where ``path`` links to the session's file, leaving that file as it is."""
    original = path.resolve().read_bytes()
    path.unlink()
    if callable(data):
        data = data(original)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def refused(models: ModelSet, message: str) -> str:
    """The check's refusal, which must match ``message`` (a regular expression)."""
    with pytest.raises(ValueError, match=message) as error:
        models.check()
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_json_file_that_is_not_a_tokenizer_is_named(models):
    """It crashed `serve` with tokenizers' bare 'Exception: data did not match any variant of untagged enum
    ModelUntagged', in a traceback, the file never named."""
    path = replace(models.llm / "tokenizer.json", '{"version": "1.0", "model": {}}')
    message = refused(models, f"^{re.escape(str(path))} is not a tokenizer the `tokenizers` library can read: "
                              "data did not match any variant")
    with pytest.raises(ValueError) as direct:
        load_tokenizer(models.llm)
    assert str(direct.value) == message
    replace(path, "[1, 2]")
    refused(models, "tokenizer.json is not a tokenizer the `tokenizers` library can read: invalid type: sequence")


@pytest.mark.parametrize("name", ["llm/config.json", "llm/tokenizer.json", "snac/config.json"])
def test_a_json_file_cut_short_is_named(models, name):
    """json's message named a line and column, not the file: 'Expecting property name enclosed in double
    quotes: line 2 column 1 (char 25)'."""
    path = replace(models.root / name, lambda whole: whole[: len(whole) // 2])
    refused(models, f"^{re.escape(str(path))} is not valid JSON: ")


def test_a_config_that_is_not_a_complete_llama_config_is_named(models):
    config = models.llm / "config.json"
    whole = json.loads(config.resolve().read_text())
    replace(config, json.dumps({k: v for k, v in whole.items() if k != "hidden_size"}))
    refused(models, f"^{re.escape(str(config))} lacks hidden_size: not a complete Llama config.json$")
    config.write_text(json.dumps(whole | {"num_hidden_layers": "2"}))
    refused(models, "config.json has num_hidden_layers '2': expected a whole number >= 1$")
    config.write_text(json.dumps(whole | {"num_key_value_heads": 3}))
    refused(models, "config.json has num_attention_heads 4, not a multiple of num_key_value_heads 3")
    config.write_text(json.dumps(whole | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    refused(models, f"^{re.escape(str(config))}: unsupported rope_scaling type 'yarn'")
    config.write_text(json.dumps(whole | {"mlp_bias": True}))
    refused(models, f"^{re.escape(str(config))} has mlp_bias True; this Llama supports only False$")
    config.write_text("[]")
    refused(models, "config.json holds a JSON list, not an object$")


def test_a_config_whose_shapes_are_not_its_weights_is_refused_from_the_headers(models):
    """A wrong hidden_size passed the checks and failed in tritonserver's model load ('failed to load all
    models'). The check reads the safetensors headers only, not the weights."""
    config = models.llm / "config.json"
    whole = json.loads(config.resolve().read_text())
    replace(config, json.dumps(whole | {"hidden_size": 128}))
    weights = models.llm / "model.safetensors"
    refused(models, f"^{re.escape(str(config))} does not describe the weights in {re.escape(str(weights))}: "
                    r"model.embed_tokens.weight is \[156940, 64\] there, \[156940, 128\] by the config "
                    r"\(vocab_size 156940, hidden_size 128, .*\) \(\d+ more tensors differ\): use the config.json "
                    "that came with these weights$")
    from orpheus_triton.llama import check_checkpoint

    with pytest.raises(ValueError, match="does not describe the weights"):
        check_checkpoint(models.llm)
    config.write_text(json.dumps(whole | {"intermediate_size": 256}))
    refused(models, r"model.layers.0.mlp.gate_proj.weight is \[128, 64\] there, \[256, 64\] by the config")
    config.write_text(json.dumps(whole | {"num_hidden_layers": 3}))
    refused(models, r"lacks \['layers.2.input_layernorm.weight', .*\] and 6 more, which its config.json calls for "
                    r"\(num_hidden_layers 3")
    config.write_text(json.dumps(whole | {"num_hidden_layers": 1}))
    refused(models, r"has tensors this Llama does not use: \['layers.1.input_layernorm.weight', .*\] and 6 more "
                    r"\(its config.json has num_hidden_layers 1\)")
    config.write_text(json.dumps(whole | {"tie_word_embeddings": False}))
    refused(models, r"lacks \['lm_head.weight'\], which its config.json calls for \(num_hidden_layers 2, "
                    "tie_word_embeddings false\\)")


def test_a_safetensors_file_cut_short_or_not_safetensors_is_named(models):
    """A cut-short weights file passed the checks (only its name was looked at) and failed in the server."""
    weights = models.llm / "model.safetensors"
    whole = weights.resolve().read_bytes()
    header = 8 + int.from_bytes(whole[:8], "little")
    replace(weights, whole[: len(whole) - 1000])
    refused(models, f"^{re.escape(str(weights))} is cut short: {len(whole) - 1000:,} bytes, where its header says "
                    f"{len(whole):,} \\(an interrupted download or copy\\? fetch it again\\)$")
    weights.write_bytes(whole[:100])
    refused(models, f"^{re.escape(str(weights))} is cut short: 100 bytes, where its header alone takes {header:,}")
    weights.write_bytes(whole[:5])
    refused(models, "model.safetensors is not a safetensors file: it is 5 bytes long")
    weights.write_bytes(b"<!DOCTYPE html><html>Rate limited</html>")
    refused(models, "model.safetensors is not a safetensors file: its first 8 bytes do not give a header length")
    weights.write_bytes((4).to_bytes(8, "little") + b"{x: }")
    refused(models, "model.safetensors is not a safetensors file: its header is not JSON")
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 6000000000\n")
    refused(models, "model.safetensors is a Git LFS pointer, not the weights: fetch them")


def test_a_shard_cut_short_is_named_and_a_broken_index_too(models, model_set):
    """A sharded checkpoint: each file its index names is checked, and an index that is not one is named."""
    from safetensors.torch import load_file

    (models.llm / "model.safetensors").unlink()
    state = load_file(model_set.llm / "model.safetensors")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, models.llm / shard)
    index = models.llm / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    models.check()
    second = models.llm / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes()[:-1])
    refused(models, f"^{re.escape(str(second))} is cut short")
    index.write_text('{"weight_map": ')
    refused(models, f"^{re.escape(str(index))} is not valid JSON")
    index.write_text('{"metadata": {}}')
    refused(models, f"^{re.escape(str(index))} has no weight_map of tensor names to file names")


def test_checkpoint_shapes_are_the_models_parameters_as_a_checkpoint_holds_them():
    """check_checkpoint's shapes are arithmetic; load_llama's names come from the model itself. The two
    must agree, tied or not, with grouped heads and an explicit head_dim."""
    from orpheus_triton.demo_models import llama_config
    from orpheus_triton.llama import LlamaConfig, checkpoint_shapes

    for shape in ({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "intermediate_size": 128},
                  {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 6, "num_key_value_heads": 3,
                   "intermediate_size": 80, "head_dim": 16}):
        for tied in (True, False):
            config = LlamaConfig.from_hf(llama_config(shape) | {"tie_word_embeddings": tied})
            shapes = checkpoint_shapes(config)
            assert list(shapes) == checkpoint_names(config)
            with torch.device("meta"):
                model = Llama(config).state_dict()
            for name, tensor in model.items():
                fused = next((f for f in FUSED_PROJECTIONS if name.endswith("." + f)), None)
                parts = [name.removesuffix(fused) + part for part in FUSED_PROJECTIONS[fused]] if fused else [name]
                assert sum(shapes[part][0] for part in parts) == tensor.shape[0], name
                assert all(shapes[part][1:] == tuple(tensor.shape[1:]) for part in parts), name


def test_a_snac_for_another_rate_is_refused_before_start(models):
    """check_snac_config refused it only as the decoder loaded, inside the server."""
    config = replace(models.snac / "config.json", json.dumps({**SNAC_24KHZ_CONFIG, "sampling_rate": 32000}))
    refused(models, f"^{re.escape(str(config))} is not a SNAC for Orpheus's codes: sampling_rate 32000 "
                    r"\(Orpheus needs 24000\)")


def test_snac_weights_that_are_not_a_pytorch_checkpoint_are_named(models, model_set):
    """A safetensors file under the name pytorch_model.bin got torch.load's advice to pass
    weights_only=False: unsafe, and no help."""
    weights = models.snac / "pytorch_model.bin"
    replace(weights, b"")
    save_file({"decoder.weight": torch.zeros(4, 4)}, weights)
    refused(models, f"^{re.escape(str(weights))} is not a PyTorch checkpoint: it looks like a safetensors file "
                    "saved under that name; the SNAC decoder reads torch.save's format: put "
                    "hubertsiuzdak/snac_24khz's pytorch_model.bin there$")
    from orpheus_triton.snac_codec import check_snac

    with pytest.raises(ValueError, match="looks like a safetensors file"):
        check_snac(models.snac)
    weights.write_bytes(b"<!DOCTYPE html>\n<html>Not Found</html>")
    refused(models, r"pytorch_model.bin is not a PyTorch checkpoint \(torch.save's zip archive or pickle\): it starts "
                    r"with b'<!DOCTYPE html>\\n'; fetch pytorch_model.bin from hubertsiuzdak/snac_24khz again$")
    weights.write_bytes(b"")
    refused(models, "pytorch_model.bin is not a PyTorch checkpoint .*: it is empty")
    whole = (model_set.snac / "pytorch_model.bin").read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # an interrupted download: the zip's directory is at its end
    refused(models, "pytorch_model.bin could not be read as SNAC weights: the zip archive torch.save writes is cut "
                    "short or damaged")
    torch.save({"decoder.weight": torch.zeros(2)}, weights, _use_new_zipfile_serialization=False)
    models.check()  # a legacy pickle: torch.load reads it (whether its tensors fit is the loader's to say)


def test_a_cache_folder_that_cannot_be_made_is_named_with_its_variable(tmp_path, monkeypatch, capsys):
    """`ORPHEUS_TRITON_CACHE=/proc/nonexistent serve` said only "[Errno 2] No such file or directory:
    '/proc/nonexistent'"."""
    from orpheus_triton.demo_models import cache_folder

    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "cache"
    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(bad))
    with pytest.raises(ValueError, match=f"^the cache folder {re.escape(str(bad))} \\(set by ORPHEUS_TRITON_CACHE\\) "
                                         "cannot be made: Not a directory; point ORPHEUS_TRITON_CACHE at a folder "
                                         "this user can write$"):
        cache_folder()
    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(tmp_path / "file"))
    with pytest.raises(ValueError, match=r"\(set by ORPHEUS_TRITON_CACHE\) is not a folder"):
        cache_folder("repositories")
    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(bad))
    monkeypatch.setattr(cli, "_model_set", lambda _: pytest.fail("the model set was prepared before the cache check"))
    ports = _free_port_arguments()
    assert cli.main(["serve", *ports]) == 2
    assert capsys.readouterr().err == (f"error: the cache folder {bad} (set by ORPHEUS_TRITON_CACHE) cannot be made: "
                                       "Not a directory; point ORPHEUS_TRITON_CACHE at a folder this user can write\n")
    good = tmp_path / "cache"
    monkeypatch.setenv("ORPHEUS_TRITON_CACHE", str(good))
    assert cache_folder("repositories") == good / "repositories" and (good / "repositories").is_dir()


def test_an_empty_voice_list_is_refused_and_none_still_means_single_speaker(monkeypatch, capsys):
    """`--voices ""` (an unset variable in --voices "$VOICES") silently served as single-speaker."""
    for empty in ("", "  "):
        with pytest.raises(ValueError, match=r"the voices are empty \('.*': an unset shell variable\?\): list the "
                                             "checkpoint's voices, comma-separated, or give 'none' for a "
                                             "single-speaker fine-tune"):
            Voices.parse(empty)
    assert Voices.parse("none") == Voices((), None) == Voices.parse(" None ")
    monkeypatch.setattr(cli, "_model_set", lambda _: pytest.fail("the model set was prepared before the check"))
    ports = _free_port_arguments()
    assert cli.main(["serve", "--voices", "", *ports]) == 2
    assert "error: the voices are empty ('': an unset shell variable?)" in capsys.readouterr().err


def test_serve_refuses_a_broken_model_set_in_one_line_before_any_server_starts(models, tmp_path):
    """The walkthrough's first finding, end to end: exit 2 and one line, no traceback, no tritonserver."""
    replace(models.llm / "tokenizer.json", '{"version": "1.0", "model": {}}')
    ports = _free_port_arguments()
    done = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "serve", "--models", str(models.root),
                           "--device", "cpu", *ports], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"ORPHEUS_TRITON_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"error: {models.llm / 'tokenizer.json'} is not a tokenizer the `tokenizers` library can "
                           "read: data did not match any variant of untagged enum ModelUntagged at line 1 column 31\n")
    assert not (tmp_path / "cache" / "repositories").exists()  # refused before a repository was rendered


def test_a_server_whose_models_fail_to_load_exits_3_not_as_a_dead_stub(models, tmp_path):
    """A SNAC config that passes the checks but does not fit its weights fails inside tritonserver, which
    exits 1, as `serve` exits 1 for a backend stub that died while serving: a supervisor could not tell a
    server that cannot start from one that crashed."""
    from orpheus_triton.server import NEVER_READY_STATUS

    replace(models.snac / "config.json", json.dumps({**SNAC_24KHZ_CONFIG, "decoder_dim": 512}))
    models.check()  # the weights' shapes are found only as the model loads
    done = subprocess.run([sys.executable, "-m", "orpheus_triton.cli", "serve", "--models", str(models.root),
                           "--device", "cpu", *_free_port_arguments()], capture_output=True, text=True, timeout=240,
                          env=os.environ | {"ORPHEUS_TRITON_CACHE": str(tmp_path / "cache")})
    assert done.returncode == NEVER_READY_STATUS == 3, done.stderr[-3000:]
    assert "error: tritonserver exited with status 1 before its models were ready" in done.stderr
    assert "snac_decoder" in done.stderr  # tritonserver's own log says which model and why
